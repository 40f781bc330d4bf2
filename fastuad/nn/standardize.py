"""Feature standardisation with running training-set statistics, kept in buffers."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TokenStandardizer"]


class TokenStandardizer(nn.Module):
    """Per-channel standardisation of ``[B, C, H, W]`` tokens with running training-set statistics.

    :meth:`update` merges a batch's per-channel mean and variance over images and tokens into
    float64 accumulators (count, mean, sum of squared deviations), so after one epoch they hold
    the training set's statistics exactly, and refreshes the float32 ``shift`` / ``scale`` that
    :meth:`forward` and :meth:`inverse` use (the only buffers an exported graph holds). All are
    buffers, saved in checkpoints. Before any update the map is the identity. Why: the branches
    then see and emit unit-scale tokens whatever the backbone's channel scales are
    (EfficientNet-Lite0's levels are signed projections with per-channel variances of 20-40 and
    means far from 0).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("shift", torch.zeros(1, channels, 1, 1))
        self.register_buffer("scale", torch.ones(1, channels, 1, 1))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the statistics of ``x [B, C, H, W]`` (Chan et al.'s parallel update)."""
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).to(self.mean.dtype)
        n = float(flat.shape[1])
        mean = flat.mean(dim=1)
        m2 = (flat - mean[:, None]).pow(2).sum(dim=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.pow(2) * (self.count * n / total)
        self.count.copy_(total)
        self.shift.copy_(self.mean.view_as(self.shift))
        self.scale.copy_((self.m2 / self.count).clamp_min(self.eps).sqrt().view_as(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
