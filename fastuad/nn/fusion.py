"""Multi-scale feature fusion (MSFF, from MemSeg, as DM-GRD uses it) and its parts.

MSFF takes per-level features that carry an input's teacher features concatenated with their
difference to a memory item (``[B, 2C_l, H_l, W_l]``) and returns ``[B, C_l, H_l, W_l]``:

1. per level, a 3x3 conv gated (elementwise product) by a non-local block, then two 3x3 convs
   that halve the width;
2. top-down fusion: each level adds the upsampled, 3x3-convolved output of the level below;
3. spatial attention: a sigmoid map from each level's channel max and mean (one shared 7x7
   conv), multiplied top-down (deeper maps upsampled), scales each level's output.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NonLocalBlock", "SpatialAttention", "MultiScaleFeatureFusion"]


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018): global self-attention over pixels.

    ``theta``/``phi``/``g`` are 1x1 convs to ``C/2``; keys and values are 2x2 max-pooled
    (``sub_sample``), the output goes through a 1x1 conv and a BatchNorm whose scale starts at 0,
    so the block starts as the identity. The attention is ``F.scaled_dot_product_attention``
    with scale 1 (the embedded Gaussian has no temperature).
    """

    def __init__(self, channels: int, sub_sample: bool = True) -> None:
        super().__init__()
        inter = max(channels // 2, 1)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.out = nn.Sequential(nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)
        self.pool = nn.MaxPool2d(2) if sub_sample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # [B, HW, C']
        src = self.pool(x) if min(h, w) >= 2 else x
        k = self.phi(src).flatten(2).transpose(1, 2)
        v = self.g(src).flatten(2).transpose(1, 2)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1.0)[:, 0]
        return x + self.out(y.transpose(1, 2).reshape(b, -1, h, w))


class SpatialAttention(nn.Module):
    """A sigmoid map ``[B, 1, H, W]`` from the channel max and mean through one ``k x k`` conv."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(stats))


class _FusionBlock(nn.Module):
    def __init__(self, cin: int, cout: int, hidden: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, hidden, 1) if hidden != cin else nn.Identity()
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.attn = NonLocalBlock(hidden)
        self.reduce = nn.Sequential(nn.Conv2d(hidden, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return self.reduce(self.conv(x) * self.attn(x))


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class MultiScaleFeatureFusion(nn.Module):
    """MSFF over levels (shallowest first): inputs ``[B, in_l, H_l, W_l]``, outputs ``[B, out_l, H_l, W_l]``.

    ``width`` in (0, 1] scales the width the gated conv and the non-local block work at
    (``1``: the input width, as MemSeg/DM-GRD; less: a 1x1 conv squeezes the input first, for
    a cheaper CPU model).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], attention_kernel: int = 7, width: float = 1.0) -> None:
        super().__init__()
        if len(in_channels) != len(out_channels) or not in_channels:
            raise ValueError(f"in_channels and out_channels must be non-empty and equally long, got {in_channels}, {out_channels}")
        if not 0 < width <= 1:
            raise ValueError(f"width must lie in (0, 1], got {width!r}")
        self.blocks = nn.ModuleList(_FusionBlock(i, o, max(1, round(i * width))) for i, o in zip(in_channels, out_channels))
        self.up = nn.ModuleList(nn.Conv2d(out_channels[l + 1], out_channels[l], 3, padding=1) for l in range(len(out_channels) - 1))
        self.sam = SpatialAttention(attention_kernel)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        fused = [blk(f) for blk, f in zip(self.blocks, feats)]
        for l in range(len(fused) - 2, -1, -1):  # top-down: deepest level first
            fused[l] = fused[l] + self.up[l](_up(fused[l + 1], fused[l]))
        gate = self.sam(feats[-1])
        outs = [fused[-1] * gate]
        for l in range(len(fused) - 2, -1, -1):
            gate = self.sam(feats[l]) * _up(gate, feats[l])
            outs.insert(0, fused[l] * gate)
        return outs
