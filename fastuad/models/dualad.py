"""DualAD: coupled dual-branch networks for multi-class anomaly detection (He et al., Electronics 2025).

A frozen encoder gives three feature levels; they are upsampled (nearest) to the first level's
grid, concatenated and average-pooled into one token grid (14 x 14 at 224 px for the paper):
that grid is the reconstruction target. Two coupled branches rebuild it from a jittered copy:

* a **wide-shallow network** (WSN) maps every token to ``depth`` chunks of width ``width`` and
  maps the narrow branch's output back to the feature width;
* a **narrow-deep network** (NDN): a ``depth``-layer transformer encoder over the sum of the
  chunks and a ``depth``-layer decoder whose layer ``i`` queries with chunk ``i`` (reading the
  encoder output, then the previous decoder layer's output). Every attention masks out a
  ``window x window`` neighbourhood around the query (UniAD's neighbour mask; here
  :class:`~fastuad.nn.NeighborMaskedAttention`, i.e. :func:`fastuad.ops.local_attention` with
  ``mode="outside"``), and a learned row/column position code, shared by all layers, is added
  to queries and keys.

Two designs of the WSN (the paper's section 3.3.3):

* ``dualad`` (**heterogeneous**, the paper's main model): the WSN is the memory-augmented MLP
  (MMLP): ``MLP(C -> 4096 -> depth*width)``, each chunk read through its own memory module
  (196 slots, cosine addressing, temperature 1, hard shrinkage ``1/196``, L1 renormalisation,
  slots initialised as random unit-norm rows; :class:`~fastuad.nn.MemoryModule` on
  :func:`fastuad.ops.memory_read`) so that anomalous tokens are rewritten from normal
  prototypes, and ``MLP(depth*width -> 4096 -> C)`` back. The NDN encoder reads the sum of the
  four memory outputs, decoder layer ``i`` queries with memory output ``i``.
* ``dualad_ho`` (**homogeneous**): the paper says this design is "entirely based on the
  transformer" and is heavier (137.3 M against 97.5 M parameters with WRes50); the memory
  module belongs to the heterogeneous design (the paper's "Memory-Augmented Heterogeneous
  CDBN"). The paper's text does not give the WSN transformer's layout, so it follows the
  authors' code (``proj_type="transformer"``): a linear ``C -> depth*width``, a wide
  neighbour-masked encoder at width ``depth*width`` (FFN 4x), the split into chunks (no memory),
  the NDN, then a wide decoder whose layers query with learned per-position queries, and a
  linear back to ``C``. The wide layers use the shared position code through a linear map to
  their width. Our choice: 2 wide encoder and 2 wide decoder layers (``wide_layers=2``), the
  count that reproduces the paper's figure - 70.50 M trainable, the paper's 137.3 M minus the
  backbone it implies from the heterogeneous row (97.5 M - 30.66 M) is 70.46 M; one layer each
  would give 40.9 M.

Training: the input tokens get Gaussian jitter ``randn * std * 3.2`` (``std`` per image and
channel over the tokens); the loss is the feature MSE per level chunk, summed over levels.
Anomaly map: per level chunk ``sqrt(mean_c (rec - target)^2)`` on the token grid, the product
over levels, bilinear (``align_corners=True``, as the authors) to the image size, no blur; image
score: the max of a ``score_pool x score_pool`` stride-1 average pool of the map (16 at 224 px).

Presets: ``paper`` is the authors' MVTec AD set-up (``wide_resnet50_2`` layers 1-3 at 224 px,
pool 4, width 256, 8 heads, FFN 1024, window 7, dropout 0.1, AdamW 1e-4, batch 16, 1200 epochs,
clip 0.1, step x0.1 at 1000). ``default`` is sized for the embedded EfficientNet-Lite0 and a
CPU: levels 1-3 (24/40/112 channels at strides 4/8/16) pooled 4x4 to stride 16 like the paper
(8 x 8 tokens at 128 px, 16 x 16 at 256 px), a 5 x 5 masked window (narrower when the grid is
smaller), NDN width 64 with 2+2 layers, 4 heads, FFN 256, MMLP hidden 512 with 2 memories of 64
slots, one wide layer pair for the homogeneous WSN, the paper's jitter, and AdamW 1e-3 with a
cosine schedule over 10 epochs (batch 4, clip 0.1). Two changes to the paper's mechanism make it
learn in those 500 steps (the ``paper`` preset keeps the authors' behaviour):

* ``standardize``: the branches see the tokens standardised per channel with running
  training-set statistics (:class:`TokenStandardizer`, buffers) and their output is mapped back
  to feature scale, so the loss and the map are the paper's. Lite0's levels are signed
  projections (per-channel variance 20-40, means far from 0): unstandardised, every MLP query
  points the same way and the output layer must learn the scale first.
* ``memory_temperature=0.1``: cosine logits lie in ``[-1, 1]``, so at T=1 the softmax over 64
  slots cannot concentrate (largest/smallest weight at most e^2); the hard shrinkage at 1/M kept
  about 24 slots and every token read nearly the same mix (read std over tokens 0.05 against a
  mean norm of 0.34 after training). In ``dualad`` the memory read is the only path from a
  token to its reconstruction (the NDN's attention masks the token's neighbourhood out and
  positions enter only queries and keys), so it ended where predicting each class's mean
  feature ends (70.8 / 88.0 on the demo set). At T=0.1 a token reads about 3 slots (addressing
  entropy 0.4 nats against 4.2 for uniform). ``dualad_ho`` has no memory; the scale alone held
  it back.

Measured on the demo set (``fastuad demo``, 10 CPU epochs, seed 0): ``dualad`` 90.3 / 95.7
image / pixel AUROC (before: 70.3 / 88.2), ``dualad_ho`` 89.3 / 94.8 (before: 69.4 / 87.4). In
short runs on cached tokens, dropping the standardisation gave 71.8 / 90.0 (``dualad``) and
71.3 / 86.9 (``dualad_ho``), T=1 gave 79.6 / 92.6, batch 8 (250 steps) 76.9 / 93.2. On the
held-out photographs at 128 px: ``dualad`` 63.6 / 82.7 (before 57.5 / 80.2), ``dualad_ho``
61.7 / 85.9 (before 54.3 / 79.2), below RD4AD's 84.3 / 96.0 there and below a
nearest-neighbour read of the same tokens (79.3 / 94.5); at 256 px ``dualad`` 75.2 / 94.5
(before 67.7 / 87.8), ``dualad_ho`` 64.1 / 90.0 (before 66.8 / 89.3). ``skip`` (the
authors' option: the wide encoder's tokens bypass the NDN) is exposed but off.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastuad.backbones import DEFAULT_BACKBONE, FrozenEncoder, create_backbone
from fastuad.models import ModelError, TrainRecipe, register_model
from fastuad.nn import MemoryModule, TokenStandardizer
from fastuad.nn.transformer import LearnedPositionEmbedding2d, MaskedDecoderLayer, MaskedEncoderLayer

__all__ = ["DualAD", "MemoryMLP", "WideTransformer", "NarrowDeepTransformer", "dualad", "dualad_ho", "PRESETS"]

VARIANTS = ("heterogeneous", "homogeneous")
# Backbones whose layers 1-3 are at strides 4/8/16, as the paper's ResNet-family runs use them.
PAPER_BACKBONES = ("wide_resnet50_2", "resnet50", "resnet34")

# The default preset's masked window (``window=None``): this, or the widest odd window the grid holds.
DEFAULT_WINDOW = 5
PRESETS: dict[str, dict] = {
    "paper": dict(
        backbone="wide_resnet50_2", image_size=224, layers=(1, 2, 3), pool=4, width=256, depth=4, num_heads=8,
        ffn_dim=1024, window=7, dropout=0.1, mlp_hidden=4096, num_slots=196, wide_layers=2, memory_temperature=1.0, skip=False, jitter=3.2,
        standardize=False, score_pool=16,
    ),
    "default": dict(
        backbone=DEFAULT_BACKBONE, image_size=256, layers=(1, 2, 3), pool=4, width=64, depth=2, num_heads=4,
        ffn_dim=256, window=None, dropout=0.1, mlp_hidden=512, num_slots=64, wide_layers=1, memory_temperature=0.1, skip=False, jitter=3.2,
        standardize=True, score_pool=None,
    ),
}
RECIPES: dict[str, TrainRecipe] = {
    "paper": TrainRecipe(
        optimizer="adamw", lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, epochs=1200, batch_size=16, grad_clip=0.1,
        schedule="step", milestones=(1000,), gamma=0.1,
    ),
    "default": TrainRecipe(
        optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, epochs=10, batch_size=4, grad_clip=0.1,
        schedule="cosine", warmup_steps=20,
    ),
}


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MemoryMLP(nn.Module):
    """The heterogeneous WSN: ``MLP -> depth memory reads`` in, ``MLP`` out."""

    def __init__(self, channels: int, width: int, depth: int, mlp_hidden: int, num_slots: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.width, self.depth = width, depth
        self.mlp_in = _mlp((channels, mlp_hidden, depth * width))
        self.memories = nn.ModuleList(MemoryModule(num_slots, width, temperature=temperature) for _ in range(depth))
        with torch.no_grad():  # slots start as random unit-norm rows (the authors' init)
            for m in self.memories:
                m.memory.copy_(F.normalize(torch.randn_like(m.memory), dim=-1))
        self.mlp_out = _mlp((depth * width, mlp_hidden, channels))

    def encode(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[list[torch.Tensor], None]:
        """``x [B, H, W, C]`` -> (``depth`` memory outputs ``[B, H, W, width]``, no shortcut)."""
        chunks = self.mlp_in(x).split(self.width, dim=-1)
        return [memory(c) for memory, c in zip(self.memories, chunks)], None

    def decode(self, outs: list[torch.Tensor], pos: torch.Tensor, shortcut: None = None) -> torch.Tensor:
        return self.mlp_out(torch.cat(outs, dim=-1))


class WideTransformer(nn.Module):
    """The homogeneous WSN: linear in, wide masked encoder, split | wide decoder with learned queries, linear out."""

    def __init__(
        self, channels: int, width: int, depth: int, grid: tuple[int, int], layers: int, num_heads: int,
        window: int, dropout: float, pos_dim: int, skip: bool = False,
    ) -> None:
        super().__init__()
        wide = depth * width
        self.width = width
        self.skip = skip
        self.proj_in = nn.Linear(channels, wide)
        self.pos_proj = nn.Linear(pos_dim, wide)
        self.encoder = nn.ModuleList(MaskedEncoderLayer(wide, num_heads, 4 * wide, window, dropout) for _ in range(layers))
        self.queries = nn.ParameterList(nn.Parameter(torch.randn(1, *grid, wide)) for _ in range(layers))
        self.decoder = nn.ModuleList(MaskedDecoderLayer(wide, num_heads, 4 * wide, window, dropout) for _ in range(layers))
        self.proj_out = nn.Linear(wide, channels)

    def encode(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``x [B, H, W, C]`` -> (``depth`` chunks ``[B, H, W, width]``, the wide tokens when ``skip``)."""
        x = self.proj_in(x)
        p = self.pos_proj(pos)
        for layer in self.encoder:
            x = layer(x, p)
        return list(x.split(self.width, dim=-1)), (x if self.skip else None)

    def decode(self, outs: list[torch.Tensor], pos: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        memory = torch.cat(outs, dim=-1)
        if shortcut is not None:  # the wide encoder's tokens skip the NDN (the authors' `skip` option)
            memory = memory + shortcut
        p = self.pos_proj(pos)
        x = memory
        for query, layer in zip(self.queries, self.decoder):
            x = layer(query, x, memory, p)
        return self.proj_out(x)


class NarrowDeepTransformer(nn.Module):
    """The NDN: masked encoder over the sum of the chunks, masked decoder layer ``i`` queried by chunk ``i``."""

    def __init__(self, width: int, depth: int, num_heads: int, ffn_dim: int, window: int, dropout: float) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(MaskedEncoderLayer(width, num_heads, ffn_dim, window, dropout) for _ in range(depth))
        self.decoder = nn.ModuleList(MaskedDecoderLayer(width, num_heads, ffn_dim, window, dropout) for _ in range(depth))

    def forward(self, chunks: list[torch.Tensor], pos: torch.Tensor) -> list[torch.Tensor]:
        x = sum(chunks[1:], chunks[0])
        for layer in self.encoder:
            x = layer(x, pos)
        memory, outs = x, []
        for chunk, layer in zip(chunks, self.decoder):
            x = layer(chunk, x, memory, pos)
            outs.append(x)
        return outs


def level_rmse_product(target: torch.Tensor, rec: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """Per level chunk ``sqrt(mean_c (rec - target)^2)``, multiplied over levels: ``[B, 1, H, W]``."""
    maps = [(r - t).pow(2).mean(dim=1, keepdim=True).sqrt() for t, r in zip(target.split(list(channels), 1), rec.split(list(channels), 1))]
    out = maps[0]
    for m in maps[1:]:
        out = out * m
    return out


class DualAD(nn.Module):
    """DualAD on a frozen ``encoder``; ``variant`` is ``"heterogeneous"`` (MMLP) or ``"homogeneous"``."""

    def __init__(
        self,
        encoder: FrozenEncoder,
        image_size: int,
        variant: str = "heterogeneous",
        pool: int = 4,
        width: int = 256,
        depth: int = 4,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        window: int = 7,
        dropout: float = 0.1,
        mlp_hidden: int = 4096,
        num_slots: int = 196,
        wide_layers: int = 2,
        memory_temperature: float = 1.0,
        skip: bool = False,
        jitter: float = 3.2,
        standardize: bool = False,
        score_pool: int | None = 16,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ModelError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.encoder = encoder
        self.image_size = image_size
        self.variant = variant
        self.channels = list(encoder.channels)
        self.pool = pool
        self.grid = image_size // (encoder.reductions[0] * pool)
        self.jitter = float(jitter)
        self.score_pool = score_pool if score_pool is not None else max(1, round(16 * image_size / 224))
        c = sum(self.channels)
        self.standardizer = TokenStandardizer(c) if standardize else None
        self.pos_embed = LearnedPositionEmbedding2d(self.grid, width)
        if variant == "heterogeneous":
            self.wsn: nn.Module = MemoryMLP(c, width, depth, mlp_hidden, num_slots, memory_temperature)
        else:
            self.wsn = WideTransformer(c, width, depth, (self.grid, self.grid), wide_layers, num_heads, window, dropout, width, skip)
        self.ndn = NarrowDeepTransformer(width, depth, num_heads, ffn_dim, window, dropout)
        self.config = dict(config or {})

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features, nearest-upsampled to the first level, concatenated and pooled: ``[B, C, g, g]``."""
        feats = self.encoder(images)
        size = feats[0].shape[-2:]
        x = torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest") for f in feats], dim=1)
        return F.avg_pool2d(x, self.pool) if self.pool > 1 else x

    def reconstruct(self, target: torch.Tensor, jitter: bool = False) -> torch.Tensor:
        """Rebuild ``target [B, C, g, g]`` (optionally from a jittered copy): ``[B, C, g, g]``.

        With ``standardize`` the branches work on standardised tokens (the statistics updated
        from ``target`` in training mode) and the output is mapped back to feature scale.
        """
        norm = self.standardizer
        if norm is not None:
            if self.training:
                norm.update(target)
            target = norm(target)
        x = target.permute(0, 2, 3, 1)
        if jitter and self.jitter > 0:
            std = x.flatten(1, 2).std(dim=1)[:, None, None, :]
            x = x + torch.randn_like(x) * std * self.jitter
        pos = self.pos_embed().to(x.dtype)
        chunks, shortcut = self.wsn.encode(x, pos)
        outs = self.ndn(chunks, pos)
        rec = self.wsn.decode(outs, pos, shortcut).permute(0, 3, 1, 2)
        return rec if norm is None else norm.inverse(rec)

    def training_loss(self, batch: dict) -> torch.Tensor:
        """Feature MSE per level chunk, summed over levels (the input tokens jittered)."""
        target = self.target(batch["image"])
        rec = self.reconstruct(target, jitter=True)
        return sum(F.mse_loss(r.float(), t.float()) for t, r in zip(target.split(self.channels, 1), rec.split(self.channels, 1)))

    def anomaly_map(self, target: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(map [B, 1, S, S], score [B])`` from the target and its reconstruction."""
        amap = level_rmse_product(target.float(), rec.float(), self.channels)
        amap = F.interpolate(amap, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)
        k = min(self.score_pool, self.image_size)
        score = F.avg_pool2d(amap, k, stride=1).flatten(1).amax(dim=1)
        return amap, score

    def forward(self, images: torch.Tensor):
        """Eval mode: ``(anomaly_map [B,1,S,S], score [B])``; train mode: ``(target, reconstruction)``."""
        target = self.target(images)
        rec = self.reconstruct(target, jitter=self.training)
        if self.training:
            return target, rec
        return self.anomaly_map(target, rec)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{name} must be a positive int, got {value!r}")
    return value


def _build(variant: str, name: str, preset: str, backbone: str | None, image_size: int | None, weights, overrides: dict) -> DualAD:
    p = dict(PRESETS[preset])
    preset_backbone, preset_size = p.pop("backbone"), p.pop("image_size")
    backbone = preset_backbone if backbone is None else backbone
    image_size = preset_size if image_size is None else image_size
    unknown = sorted(set(overrides) - set(p))
    if unknown:
        raise ModelError(f"model {name!r}: unexpected keyword argument {unknown[0]!r}; allowed: {', '.join(sorted(p))}")
    p.update(overrides)
    if preset == "paper" and backbone not in PAPER_BACKBONES:
        raise ModelError(
            f"preset 'paper' pools layers 1-3 at strides 4/8/16 to a 14x14 grid; backbone must be one of "
            f"{', '.join(PAPER_BACKBONES)}, got {backbone!r} (use preset 'default' for other backbones)"
        )
    if not isinstance(p["standardize"], bool):
        raise ModelError(f"standardize must be True or False, got {p['standardize']!r}")
    for key in ("pool", "width", "depth", "num_heads", "ffn_dim", "mlp_hidden", "num_slots", "wide_layers"):
        _positive_int(key, p[key])
    if p["window"] is not None and _positive_int("window", p["window"]) % 2 == 0:
        raise ModelError(f"window must be an odd int, got {p['window']!r}")
    if p["width"] % p["num_heads"] or p["width"] % 2:
        raise ModelError(f"width must be even and divisible by num_heads={p['num_heads']}, got {p['width']!r}")
    if p["score_pool"] is not None:
        _positive_int("score_pool", p["score_pool"])
    layers = tuple(int(i) for i in p.pop("layers"))
    encoder = create_backbone(backbone, out_indices=layers, weights=weights)
    reds = encoder.reductions
    if any(r % reds[0] for r in reds) or list(reds) != sorted(reds):
        raise ModelError(f"layers must be given shallowest first at strides that are multiples of the first, got strides {reds}")
    token_stride = reds[0] * p["pool"]
    step = math.lcm(token_stride, max(reds))
    if image_size % step:
        raise ModelError(
            f"image_size must be a multiple of {step} for backbone {backbone!r} with layers {list(layers)} and pool "
            f"{p['pool']} (token stride {token_stride}), got {image_size}"
        )
    grid = image_size // token_stride
    if p["window"] is None:  # the default preset: 5, or the widest odd window the grid holds
        p["window"] = min(DEFAULT_WINDOW, grid - 1 + grid % 2)
    if p["window"] > grid:
        raise ModelError(
            f"window must be an odd int <= the token grid side {grid} (image_size {image_size} / token stride "
            f"{token_stride}); allowed: {', '.join(str(w) for w in range(1, grid + 1, 2))}; got {p['window']}"
        )
    config = {"name": name, "backbone": backbone, "image_size": image_size, "layers": list(layers), **overrides}
    model = DualAD(encoder, image_size=image_size, variant=variant, config=config, **p)
    model.recipe = RECIPES[preset]
    return model


@register_model(name="dualad", presets=("default", "paper"))
def dualad(
    backbone: str | None = None, image_size: int | None = None, weights: str | None = None, preset: str = "default", **overrides
) -> DualAD:
    """Heterogeneous DualAD (memory-augmented MLP + narrow-deep transformer)."""
    return _build("heterogeneous", "dualad", preset, backbone, image_size, weights, overrides)


@register_model(name="dualad_ho", presets=("default", "paper"))
def dualad_ho(
    backbone: str | None = None, image_size: int | None = None, weights: str | None = None, preset: str = "default", **overrides
) -> DualAD:
    """Homogeneous DualAD (wide-shallow + narrow-deep transformers)."""
    return _build("homogeneous", "dualad_ho", preset, backbone, image_size, weights, overrides)
