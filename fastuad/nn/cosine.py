"""Module forms of the cosine-distance ops: the anomaly-map head and the distillation loss."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fastuad.ops._dispatch import check_backend_name
from fastuad.ops._validate import check_positive_float
from fastuad.ops.cosdist import cosine_distance
from fastuad.ops.cosmap import REDUCTIONS, cosine_distance_map, gaussian_kernel1d


class CosineDistanceMap(nn.Module):
    """Turns per-scale (teacher, student) features into an anomaly map ``[B, 1, H, W]``.

    The Gaussian weights are built once and kept as a (non-persistent) buffer, so they follow
    ``.to(device)`` and no call pays a host-to-device copy. See
    :func:`fastuad.ops.cosmap` for the semantics.
    """

    def __init__(
        self,
        out_size: int | tuple[int, int] | None = None,
        reduction: str = "mean",
        blur_sigma: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        blur_sigma = check_positive_float("blur_sigma", blur_sigma, allow_zero=True)
        check_backend_name(backend)
        self.out_size = out_size
        self.reduction = reduction
        self.blur_sigma = blur_sigma
        self.backend = backend
        weights = gaussian_kernel1d(self.blur_sigma) if self.blur_sigma > 0 else []
        self.register_buffer("gaussian", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
        return cosine_distance_map(
            feats_a,
            feats_b,
            out_size=self.out_size,
            reduction=self.reduction,
            blur_sigma=self.blur_sigma,
            backend=self.backend,
            gaussian=self.gaussian if self.blur_sigma > 0 else None,
        )

    def extra_repr(self) -> str:
        return f"out_size={self.out_size}, reduction={self.reduction!r}, blur_sigma={self.blur_sigma}, backend={self.backend!r}"


def check_level_lists(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> None:
    """Two per-level feature lists to compare: non-empty and of equal length."""
    if len(feats_a) != len(feats_b) or len(feats_a) == 0:
        raise ValueError(f"feats_a and feats_b must be non-empty lists of equal length, got {len(feats_a)} and {len(feats_b)}")


class CosineDistanceLoss(nn.Module):
    """Reverse-distillation loss: mean over pixels of ``1 - cos`` per scale, summed over scales."""

    def __init__(self, eps: float = 1e-8, backend: str = "auto") -> None:
        super().__init__()
        check_backend_name(backend)
        self.eps = eps
        self.backend = backend

    def forward(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
        check_level_lists(feats_a, feats_b)
        return sum(cosine_distance(a, b, eps=self.eps, backend=self.backend).mean() for a, b in zip(feats_a, feats_b))
