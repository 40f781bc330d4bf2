"""Loss and anomaly map of feature-reconstruction models: squared error plus cosine distance.

Feature-reconstruction models (RLR) rebuild each encoder level and compare rebuilt and real
features by both magnitude (mean squared error over channels) and direction (``1 - cos``).
The cosine parts go through :mod:`fastuad.ops` (:func:`~fastuad.ops.cosine_distance` for the
loss, :func:`~fastuad.ops.cosine_distance_map` for the map's distances and resizing); the
squared error is one elementwise line beside them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastuad.nn.cosine import check_level_lists
from fastuad.ops._dispatch import check_backend_name
from fastuad.ops._validate import check_positive_float
from fastuad.ops.cosdist import cosine_distance
from fastuad.ops.cosmap import cosine_distance_map, gaussian_blur_reference

__all__ = ["MSECosineLoss", "MSECosineMap"]


def _check_pairs(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> None:
    check_level_lists(feats_a, feats_b)
    for i, (a, b) in enumerate(zip(feats_a, feats_b)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() != 4 or a.shape != b.shape:
            sa = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            sb = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"level {i}: feats_a and feats_b must be [B, C, H, W] of equal shape, got {sa} and {sb}")


class MSECosineLoss(nn.Module):
    """Sum over levels of ``mean((a - b)²) + mean(1 - cos(a, b))`` (cosine over channels).

    Features are ``[B, C, H, W]`` per level. RLR's training loss (reconstruction vs. the clean
    encoder features).
    """

    def __init__(self, eps: float = 1e-8, backend: str = "auto") -> None:
        super().__init__()
        check_backend_name(backend)
        self.eps = eps
        self.backend = backend

    def forward(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_pairs(feats_a, feats_b)
        total = 0.0
        for a, b in zip(feats_a, feats_b):
            mse = F.mse_loss(a.float(), b.float())
            total = total + mse + cosine_distance(a, b, eps=self.eps, backend=self.backend).mean()
        return total


class MSECosineMap(nn.Module):
    """Anomaly map ``[B, 1, H, W]`` from per-position ``mean_c (a - b)² + (1 - cos(a, b))``.

    Per level the two terms are resized bilinearly (``align_corners=False``) to ``out_size``,
    combined over levels by ``reduction`` (``"mean"`` or ``"sum"``) and, when ``blur_sigma > 0``,
    blurred once with scipy's ``gaussian_filter`` (``reflect``, ``truncate=4``). Both steps are
    linear, so the cosine term is the fused :func:`~fastuad.ops.cosine_distance_map` (unblurred)
    and the squared-error term is added before the single blur.
    """

    REDUCTIONS = ("mean", "sum")

    def __init__(
        self, out_size: int | tuple[int, int], reduction: str = "mean", blur_sigma: float = 0.0, backend: str = "auto"
    ) -> None:
        super().__init__()
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"reduction must be one of {self.REDUCTIONS} (linear in the levels), got {reduction!r}")
        check_backend_name(backend)
        self.out_size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        self.reduction = reduction
        self.blur_sigma = check_positive_float("blur_sigma", blur_sigma, allow_zero=True)
        self.backend = backend

    def squared_error_map(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
        """The squared-error term alone: per level ``mean_c (a - b)²``, resized and reduced, unblurred."""
        maps = [
            F.interpolate((a.float() - b.float()).pow(2).mean(1, keepdim=True), size=self.out_size, mode="bilinear", align_corners=False)
            for a, b in zip(feats_a, feats_b)
        ]
        total = torch.stack(maps, 0).sum(0)
        return total / len(maps) if self.reduction == "mean" else total

    def forward(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_pairs(feats_a, feats_b)
        cos = cosine_distance_map(feats_a, feats_b, out_size=self.out_size, reduction=self.reduction, backend=self.backend)
        amap = cos.float() + self.squared_error_map(feats_a, feats_b)
        if self.blur_sigma > 0:
            amap = gaussian_blur_reference(amap, self.blur_sigma)
        return amap

    def extra_repr(self) -> str:
        return f"out_size={self.out_size}, reduction={self.reduction!r}, blur_sigma={self.blur_sigma}, backend={self.backend!r}"
