"""RLR: reconstruct features from a learnable reference (He et al., ECCV 2024).

Reconstruction models for many classes at once tend to learn shortcuts: they copy their input
(identity mapping) or learn to remove the noise they are trained against, so they rebuild
anomalies too. RLR rebuilds each encoder feature level from a **learnable reference** instead:

- a frozen encoder gives feature levels (each 3x3 average-pooled, stride 1); per level an
  independent transformer rebuilds the level's tokens;
- the tokens and a learnable reference ``[1, H, W, C]`` are each embedded by their own 1x1
  conv to the level's width plus a fixed 2-D sine position code;
- a layer is ``x = LN(2·LCA(x) + MLKA(x))`` (no residual from the layer input, so the tokens
  cannot pass through unchanged), then ``x = LN(x + FFN(x))``; after the last layer a final LN
  and a linear map back to the level's channels;
- **LCA**, local cross attention (:class:`fastuad.nn.LocalCrossAttention`): queries from the
  tokens, keys and values from the embedded reference, inside a local window: normal patterns
  are stored in the reference at their place;
- **MLKA**, masked learnable-key attention (:class:`fastuad.nn.NeighborMaskedAttention` with
  ``key=reference, value=x``): the tokens' own values, addressed with the reference's keys,
  with the same window masked out, so no token can read itself or its neighbours;
- in training every token gets feature jitter ``randn · (‖f‖₂ / C) · 4`` and the target is the
  clean feature; the loss per level is ``MSE + mean(1 - cos)``
  (:class:`fastuad.nn.MSECosineLoss`);
- the map is per position ``mean_c (f - f̂)² + (1 - cos)``, resized bilinearly to the image,
  averaged over levels and blurred with σ=4 (:class:`fastuad.nn.MSECosineMap`); the image
  score is the map's maximum.

Both attentions run on :func:`fastuad.ops.local_attention` (``inside`` / ``outside``); no
``HW×HW`` mask is built here. Where the authors' code (hlr7999/RLR) differs from this file:
it resizes the maps with ``align_corners=True`` and computes the pixel AUROC before the blur;
fastuad's map contract is ``align_corners=False`` and one blurred map for both scores.

Presets: ``"paper"`` is the authors' MVTec AD configuration (``tf_efficientnet_b6`` at 256 px,
levels at strides 8 and 16 with 72 and 200 channels, widths 256/512, 4 layers, 8 heads, FFN
4x, windows 7x7 / 5x5, Adam 1e-4, batch 4, 200 epochs; 21,514,512 trainable parameters).
``"default"`` keeps the architecture on the embedded EfficientNet-Lite0 (40 and 112 channels at
strides 8 and 16) with widths 64/128 and 2 layers so that a CPU epoch over the demo set takes
seconds (attention still takes most of a step); Adam 2e-3 with cosine decay, batch
8, 10 epochs, because 10 epochs are a few hundred steps where the paper's 1e-4 runs ~180k.
Windows left as ``None`` cover the same fraction of the feature grid as the paper's 7/32 and
5/16 (exactly 7 and 5 at 256 px, 3 and 3 at 128 px).

On Lite0's stage outputs the squared-error term of the map is 20-50 times the cosine term, so
it decides the image score; on the demo's two object classes the cosine term alone would rank
images better (a measurement, not a change: the map is the paper's).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastuad.backbones import DEFAULT_BACKBONE, BackboneError, FrozenEncoder, create_backbone
from fastuad.models import ModelError, TrainRecipe, register_model
from fastuad.nn import LocalCrossAttention, MSECosineLoss, MSECosineMap, NeighborMaskedAttention, sine_position_code_2d

__all__ = ["RLR", "RLRLayer", "ReferenceTransformer", "PRESETS", "paper_windows", "feature_jitter", "rlr"]

# The paper's windows per level and the grid they were set for (256 px, strides 8 and 16).
_PAPER_WINDOWS = ((7, 32), (5, 16))

PRESETS: dict[str, dict] = {
    "paper": dict(
        backbone="tf_efficientnet_b6",
        image_size=256,
        layers=(2, 3),
        widths=(256, 512),
        depth=4,
        heads=8,
        ffn_ratio=4,
        dropout=0.0,
        windows=None,
        jitter=4.0,
        recipe=dict(optimizer="adam", lr=1e-4, betas=(0.9, 0.999), epochs=200, batch_size=4),
    ),
    "default": dict(
        backbone=DEFAULT_BACKBONE,
        image_size=256,
        layers=(2, 3),
        widths=(64, 128),
        depth=2,
        heads=8,
        ffn_ratio=4,
        dropout=0.0,
        windows=None,
        jitter=4.0,
        # The paper's Adam (default betas); its 1e-4 is for ~180k steps. A 10-epoch CPU run has a
        # few hundred, so a higher peak rate with cosine decay (the loss converges, the paper's
        # rate leaves it far from converged at 10 epochs).
        recipe=dict(optimizer="adam", lr=2e-3, betas=(0.9, 0.999), epochs=10, batch_size=8, schedule="cosine"),
    ),
}
# What a caller may override (besides backbone, image_size and weights).
OPTIONS = ("layers", "widths", "depth", "heads", "ffn_ratio", "dropout", "windows", "jitter")


def paper_windows(grids: Sequence[int]) -> tuple[int, ...]:
    """Windows covering the paper's fraction of each grid (7/32 for level 0, 5/16 after), odd, 3..grid."""
    out = []
    for i, grid in enumerate(grids):
        window, ref_grid = _PAPER_WINDOWS[min(i, len(_PAPER_WINDOWS) - 1)]
        w = 2 * math.floor(window * grid / ref_grid / 2) + 1  # nearest odd number (halves round down)
        out.append(max(1, min(max(3, w), grid if grid % 2 else grid - 1)))
    return tuple(out)


def feature_jitter(tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """``tokens + randn · (‖token‖₂ / C) · scale`` for channels-last ``[..., C]`` tokens."""
    norms = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
    return tokens + torch.randn_like(tokens) * norms * scale


class RLRLayer(nn.Module):
    """``x = LN(2·LCA(x, ref) + MLKA(x, ref))``, then ``x = LN(x + FFN(x))`` on ``[B, H, W, C]`` tokens."""

    def __init__(self, dim: int, heads: int, window: int, ffn_ratio: int = 4, dropout: float = 0.0, lca_weight: float = 2.0) -> None:
        super().__init__()
        self.lca = LocalCrossAttention(dim, heads, window)
        self.mlka = NeighborMaskedAttention(dim, heads, window)
        self.lca_weight = lca_weight
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim * ffn_ratio), nn.GELU(), nn.Linear(dim * ffn_ratio, dim), nn.Dropout(dropout)
        )
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        lca = self.lca(x, reference)  # q = x, k = v = reference, inside the window
        mlka = self.mlka(x, key=reference, value=x)  # q = v = x, k = reference, window masked out
        x = self.norm1(self.lca_weight * self.drop(lca) + self.drop(mlka))
        return self.norm2(x + self.ffn(x))


class ReferenceTransformer(nn.Module):
    """One level's reconstructor: ``[B, H, W, C]`` tokens -> ``[B, H, W, C]`` rebuilt from the reference."""

    def __init__(
        self, channels: int, grid: tuple[int, int], width: int, depth: int, heads: int, window: int, ffn_ratio: int, dropout: float
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(channels, width)  # a 1x1 conv on channels-last tokens
        self.reference = nn.Parameter(torch.randn(1, *grid, channels))
        self.ref_embed = nn.Linear(channels, width)
        for lin in (self.embed, self.ref_embed):
            nn.init.kaiming_normal_(lin.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.register_buffer("position", sine_position_code_2d(grid[0], grid[1], width), persistent=False)
        self.layers = nn.ModuleList(RLRLayer(width, heads, window, ffn_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position
        ref = self.ref_embed(self.reference) + self.position
        for layer in self.layers:
            x = layer(x, ref)
        return self.head(self.norm(x))


class RLR(nn.Module):
    """Frozen ``encoder`` and one :class:`ReferenceTransformer` per feature level."""

    def __init__(
        self,
        encoder: FrozenEncoder,
        image_size: int,
        widths: Sequence[int],
        windows: Sequence[int],
        depth: int = 4,
        heads: int = 8,
        ffn_ratio: int = 4,
        dropout: float = 0.0,
        jitter: float = 4.0,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_size = image_size
        self.jitter = float(jitter)
        self.grids = [image_size // r for r in encoder.reductions]
        self.levels = nn.ModuleList(
            ReferenceTransformer(c, (g, g), w, depth, heads, win, ffn_ratio, dropout)
            for c, g, w, win in zip(encoder.channels, self.grids, widths, windows)
        )
        self.loss_fn = MSECosineLoss()
        self.map_head = MSECosineMap(out_size=image_size, reduction="mean", blur_sigma=4)
        self.config = dict(config or {})

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ModelError(f"images must be [B, 3, {s}, {s}] (this RLR was built for image_size={s}), got {shape}")

    def targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The clean features to rebuild: each encoder level 3x3 average-pooled (stride 1), ``[B, C, H, W]``."""
        self._check_images(images)
        with torch.no_grad():
            return [F.avg_pool2d(f, 3, stride=1, padding=1) for f in self.encoder(images)]

    def reconstruct(self, feats: Sequence[torch.Tensor], jitter: bool = False) -> list[torch.Tensor]:
        """Each level rebuilt by its transformer (from jittered tokens when ``jitter``), ``[B, C, H, W]``."""
        out = []
        for f, level in zip(feats, self.levels):
            tokens = f.permute(0, 2, 3, 1)
            if jitter and self.jitter > 0:
                tokens = feature_jitter(tokens, self.jitter)
            out.append(level(tokens).permute(0, 3, 1, 2))
        return out

    def training_loss(self, batch: dict) -> torch.Tensor:
        """Sum over levels of ``MSE + mean(1 - cos)`` between the rebuilt jittered and the clean features."""
        feats = self.targets(batch["image"])
        return self.loss_fn(self.reconstruct(feats, jitter=True), feats)

    def forward(self, images: torch.Tensor):
        """Eval mode: ``(anomaly_map [B,1,S,S], score [B])``; train mode: ``(targets, reconstructions)``."""
        feats = self.targets(images)
        rebuilt = self.reconstruct(feats, jitter=self.training)
        if self.training:
            return feats, rebuilt
        amap = self.map_head(feats, rebuilt)
        return amap, amap.flatten(1).amax(dim=1)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"rlr: {name} must be a positive int, got {value!r}")
    return value


def _per_level(name: str, value: object, n: int) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (tuple, list)) or len(values) != n:
        raise ModelError(f"rlr: {name} must be an int or one int per feature level ({n} levels), got {value!r}")
    return tuple(_positive_int(f"{name}[{i}]", v) for i, v in enumerate(values))


@register_model(name="rlr", presets=("default", "paper"))
def rlr(
    backbone: str | None = None,
    image_size: int | None = None,
    weights: str | None = None,
    preset: str = "default",
    **overrides,
) -> RLR:
    """RLR on a frozen timm encoder; ``preset`` ``"default"`` (EfficientNet-Lite0) or ``"paper"`` (b6, 256 px).

    Overrides: ``layers`` (encoder feature levels), ``widths`` (per level), ``depth``, ``heads``,
    ``ffn_ratio``, ``dropout``, ``windows`` (odd, per level, at most the level's grid; ``None``
    scales the paper's), ``jitter``.
    """
    if preset not in PRESETS:
        raise ModelError(f"rlr has no preset {preset!r}; allowed presets: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(OPTIONS))
    if unknown:
        raise ModelError(f"rlr: unexpected keyword argument {unknown[0]!r}; allowed: backbone, image_size, weights, {', '.join(OPTIONS)}")
    p = {**PRESETS[preset], **overrides}
    backbone = p["backbone"] if backbone is None else backbone
    image_size = p["image_size"] if image_size is None else image_size
    layers = tuple(p["layers"])
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
        raise ModelError(f"rlr: layers must be non-empty encoder feature indices (ints >= 0), got {p['layers']!r}")
    try:
        encoder = create_backbone(backbone, out_indices=layers, weights=weights)
    except (BackboneError, IndexError) as exc:  # timm raises IndexError for a feature level it does not have
        why = str(exc) if isinstance(exc, BackboneError) else "it has fewer feature levels (timm features_only out_indices)"
        raise ModelError(f"rlr (preset {preset!r}) cannot use backbone {backbone!r} with layers={list(layers)}: {why}") from exc

    n = len(layers)
    if any(image_size % r for r in encoder.reductions):
        raise ModelError(f"rlr: image_size must be a multiple of the level strides {encoder.reductions}, got {image_size}")
    grids = [image_size // r for r in encoder.reductions]
    if min(grids) < 2:
        raise ModelError(
            f"rlr: image_size={image_size} gives a {min(grids)}x{min(grids)} grid at stride {max(encoder.reductions)}; "
            f"allowed: image_size >= {2 * max(encoder.reductions)} (multiples of 32)"
        )
    widths = _per_level("widths", p["widths"], n)
    heads = _positive_int("heads", p["heads"])
    for w in widths:
        if w % heads or w % 4:
            raise ModelError(f"rlr: widths must be multiples of 4 and of heads={heads}, got {list(widths)}")
    windows = paper_windows(grids) if p["windows"] is None else _per_level("windows", p["windows"], n)
    for i, (w, g) in enumerate(zip(windows, grids)):
        if w % 2 == 0 or w > g:
            raise ModelError(
                f"rlr: windows[{i}]={w} does not fit level {i}'s {g}x{g} grid at image_size={image_size}; "
                f"allowed: odd ints from 1 to {g if g % 2 else g - 1}"
            )
    depth = _positive_int("depth", p["depth"])
    ffn_ratio = _positive_int("ffn_ratio", p["ffn_ratio"])
    dropout, jitter = p["dropout"], p["jitter"]
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ModelError(f"rlr: dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(jitter, (int, float)) or jitter < 0:
        raise ModelError(f"rlr: jitter must be a number >= 0, got {jitter!r}")

    config = {"name": "rlr", "backbone": backbone, "image_size": image_size, **{k: _plain(v) for k, v in overrides.items()}}
    model = RLR(encoder, image_size, widths, windows, depth, heads, ffn_ratio, float(dropout), float(jitter), config=config)
    model.recipe = TrainRecipe(**p["recipe"])
    return model


def _plain(value):
    """Tuples as lists, so the config is plain containers (checkpoints load with ``weights_only=True``)."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value
