"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

A frozen ImageNet encoder gives *locally aware patch features*: two mid-level feature maps
(default: EfficientNet-Lite0 strides 8 and 16; the paper: WideResNet-50 layers 2 and 3), each
averaged over its 3x3 neighbourhood, the coarser one bilinearly upsampled to the finer grid.
Every patch is then projected as the paper does, by adaptive average pooling over channels:
each level to ``pre_dim`` values, the levels concatenated and pooled again to ``embed_dim``.

No gradient training: :meth:`PatchCore.fit_memory` (the engine's model-contract hook) passes
the training set once, at epoch 0, and stores the patch features of every class in ONE
:class:`~fastuad.nn.MemoryBank` (the unified setting), subsampled with the greedy k-center
coreset to ``coreset_ratio`` of its rows. The bank is a buffer, so checkpoints carry it.

Scoring (:meth:`PatchCore.forward`): a patch's score is its distance to the nearest bank entry
(:func:`fastuad.ops.knn`). The image score is the paper's reweighted maximum (its eq. 7): with
``m_test`` the patch of largest score ``s*`` and ``m*`` its nearest bank entry,
``s = (1 - exp|m_test - m*| / Σ_{m ∈ N_k(m*)} exp|m_test - m|) · s*`` over the ``k`` nearest
bank neighbours ``N_k(m*)`` of ``m*`` (itself included), so a patch far from a dense region of
the bank scores higher than one near a sparse region. The patch-score grid is bilinearly
upsampled to the image size and blurred with a Gaussian of sigma 4 (scipy's filter).

Choices the paper leaves open: the 3x3 average excludes the zero padding at the borders; the
greedy coreset works on a seeded Gaussian projection of the features to 128 dims (as the paper
does) when ``embed_dim`` is larger. The authors' code scores images by the plain maximum; this
follows the paper's reweighting.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastuad.backbones import DEFAULT_BACKBONE, FrozenEncoder, create_backbone
from fastuad.models import ModelError, TrainRecipe, register_model
from fastuad.nn import MemoryBank
from fastuad.ops.cosmap import gaussian_blur_reference

__all__ = ["PatchCore", "PatchFeatures", "patchcore"]


class PatchFeatures(nn.Module):
    """Locally aware patch features ``[B, embed_dim, h, w]`` on the finest requested level's grid.

    Per level: 3x3 average over the neighbourhood, bilinear upsampling to the first level's grid,
    adaptive average pooling of the channels to ``pre_dim``; then the levels' vectors are
    concatenated and pooled to ``embed_dim`` (PatchCore's channel projection: no parameters).
    """

    def __init__(self, pre_dim: int, embed_dim: int, patch_size: int = 3) -> None:
        super().__init__()
        for name, value in (("pre_dim", pre_dim), ("embed_dim", embed_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"{name} must be a positive int, got {value!r}")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1 or patch_size % 2 == 0:
            raise ModelError(f"patch_size must be an odd positive int, got {patch_size!r}")
        self.pre_dim, self.embed_dim, self.patch_size = pre_dim, embed_dim, patch_size

    @staticmethod
    def _pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
        """``[B, C, h, w]`` -> ``[B, dim, h, w]`` by adaptive average pooling over ``C``."""
        b, c, h, w = x.shape
        if c == dim:
            return x
        flat = x.permute(0, 2, 3, 1).reshape(-1, 1, c)
        return F.adaptive_avg_pool1d(flat, dim).reshape(b, h, w, dim).permute(0, 3, 1, 2)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        p = self.patch_size
        levels = []
        for f in feats:
            f = F.avg_pool2d(f.float(), p, stride=1, padding=p // 2, count_include_pad=False)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            levels.append(self._pool_channels(f, self.pre_dim))
        return self._pool_channels(torch.cat(levels, dim=1), self.embed_dim)


class PatchCore(nn.Module):
    """Frozen ``encoder`` -> :class:`PatchFeatures` -> one coreset :class:`MemoryBank` for all classes."""

    def __init__(
        self,
        encoder: FrozenEncoder,
        image_size: int,
        pre_dim: int = 128,
        embed_dim: int = 128,
        coreset_ratio: float = 0.1,
        k: int = 9,
        blur_sigma: float = 4.0,
        projection_dim: int | None = 128,
        batch_size: int = 16,
        seed: int = 0,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        if isinstance(coreset_ratio, bool) or not isinstance(coreset_ratio, (int, float)) or not 0 < coreset_ratio <= 1:
            raise ModelError(f"coreset_ratio must lie in (0, 1], got {coreset_ratio!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ModelError(f"k (neighbours of the image-score reweighting) must be a positive int, got {k!r}")
        if not blur_sigma >= 0:
            raise ModelError(f"blur_sigma must be >= 0, got {blur_sigma!r}")
        self.encoder = encoder
        self.image_size = image_size
        self.patches = PatchFeatures(pre_dim, embed_dim)
        self.bank = MemoryBank(embed_dim)
        self.coreset_ratio = float(coreset_ratio)
        self.k = k
        self.blur_sigma = float(blur_sigma)
        self.projection_dim = projection_dim
        self.seed = seed
        # no trainable parameters: the engine skips the gradient loop, one pass fills the bank
        self.recipe = TrainRecipe(epochs=1, batch_size=batch_size)
        self.config = dict(config or {})

    # -- features and bank -----------------------------------------------------------------

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``[B, D, h, w]`` (float32) of ImageNet-normalised images."""
        return self.patches(self.encoder(images))

    @torch.no_grad()
    def fit_memory(self, loader, epoch: int = 0, progress: bool = False) -> None:
        """Fill the bank from the training set at epoch 0: every patch feature, then the coreset.

        The features go into one preallocated ``[N·h·w, D]`` tensor on the model's device, so
        the peak is that tensor plus the coreset's ``O(N·h·w)`` distances (no ``N×M`` matrix).
        """
        if epoch != 0 and len(self.bank):
            return
        from tqdm.auto import tqdm

        device = self.bank.features.device
        store, filled = None, 0
        total_images = len(loader.dataset)
        for batch in tqdm(loader, disable=not progress, desc="patchcore: memory bank", dynamic_ncols=True, leave=False):
            f = self.embed(batch["image"].to(device, non_blocking=True))
            rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            if store is None:
                store = torch.empty(total_images * f.shape[2] * f.shape[3], f.shape[1], device=device)
            store[filled : filled + rows.shape[0]] = rows
            filled += rows.shape[0]
        if store is None or filled == 0:
            raise ModelError("PatchCore.fit_memory got no training images")
        features = store[:filled]
        self.bank.fit(features, coreset_ratio=self.coreset_ratio, projection_dim=self.projection_dim, seed=self.seed)

    # -- scoring ---------------------------------------------------------------------------

    def training_loss(self, batch: dict) -> torch.Tensor:
        raise ModelError("PatchCore has no gradient training: its memory bank is filled by fit_memory (fastuad train does it)")

    def patch_scores(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-bank-entry distance ``[B, h, w]`` and that entry's index ``[B, h, w]``."""
        if len(self.bank) == 0:
            raise ModelError(
                "PatchCore's memory bank is empty: build it first (fastuad train --model patchcore, or "
                "model.fit_memory(loader)) or load a trained checkpoint"
            )
        b, d, h, w = feats.shape
        dist, index = self.bank(feats.permute(0, 2, 3, 1).reshape(-1, d), k=1)
        return dist.view(b, h, w), index.view(b, h, w)

    def image_scores(self, feats: torch.Tensor, dist: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The paper's reweighted maximum patch score (eq. 7) per image ``[B]``."""
        b, d = feats.shape[:2]
        s_star, where = dist.flatten(1).max(dim=1)  # [B]
        m_test = feats.flatten(2).gather(2, where.view(b, 1, 1).expand(b, d, 1))[:, :, 0]  # [B, D]
        m_star = index.flatten(1).gather(1, where[:, None])[:, 0]  # [B]
        k = min(self.k, len(self.bank))
        bank = self.bank.features
        _, neighbours = self.bank(bank[m_star].to(feats.dtype), k=k)  # N_k(m*) in the bank, m* first
        # |m_test - m| for the k entries (k small): a softmax is exp(d_0) / Σ exp(d_j), stable
        d_nb = (bank[neighbours].to(feats.dtype) - m_test[:, None]).norm(dim=-1)  # [B, k]
        d_nb[:, 0] = s_star  # m* itself: exactly the distance the knn found
        weight = 1.0 - torch.softmax(d_nb, dim=1)[:, 0]
        return weight * s_star

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(anomaly_map [B,1,S,S] float32, score [B])``."""
        feats = self.embed(images)
        dist, index = self.patch_scores(feats)
        score = self.image_scores(feats, dist, index)
        amap = F.interpolate(dist[:, None].float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.blur_sigma > 0:
            amap = gaussian_blur_reference(amap, self.blur_sigma)
        return amap, score.float()


_PRESETS = {
    # EfficientNet-Lite0 strides 8 and 16 (40 and 112 channels); small dims for a CPU
    "default": dict(backbone=DEFAULT_BACKBONE, image_size=256, layers=(2, 3), pre_dim=128, embed_dim=128),
    # the paper: WideResNet-50 layers 2 and 3, 1024-dim projections (it center-crops 224 of 256)
    "paper": dict(backbone="wide_resnet50_2", image_size=256, layers=(2, 3), pre_dim=1024, embed_dim=1024),
}


@register_model(presets=("default", "paper"))
def patchcore(
    backbone: str | None = None,
    image_size: int | None = None,
    weights: str | None = None,
    layers: Sequence[int] | None = None,
    preset: str = "default",
    **overrides,
) -> PatchCore:
    """PatchCore on a frozen timm encoder; ``coreset_ratio`` (default 0.1), ``k`` (default 9),
    ``pre_dim``/``embed_dim`` (the channel projections) override the preset."""
    base = _PRESETS[preset]
    backbone = base["backbone"] if backbone is None else backbone
    image_size = base["image_size"] if image_size is None else image_size
    layers = tuple(base["layers"] if layers is None else layers)
    if len(layers) < 1:
        raise ModelError("layers must name at least one encoder level")
    kwargs = {"pre_dim": base["pre_dim"], "embed_dim": base["embed_dim"], **overrides}
    encoder = create_backbone(backbone, out_indices=layers, weights=weights)
    config = {"name": "patchcore", "backbone": backbone, "image_size": image_size, "layers": [int(i) for i in layers], **kwargs}
    return PatchCore(encoder, image_size=image_size, config=config, **kwargs)
