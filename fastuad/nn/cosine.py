"""Module forms of the cosine-distance ops: the anomaly-map head and the distillation loss."""

from __future__ import annotations

import math
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
    """Reverse-distillation loss: mean over pixels of ``1 - cos`` per scale, summed over scales.

    ``hard_quantile=q`` (hard-point mining, after ReContrast and Dinomaly): per scale, the pixels
    of the batch whose distance lies below the ``q``-quantile of that scale's distances count
    with weight ``easy_weight`` instead of 1 in a weighted mean (weights from detached distances,
    so they steer the gradient and are not trained). Why: most pixels of a training batch are
    easy (flat regions, regular texture); an unweighted mean spends the short training on them
    while the student keeps a large error on normal fine detail (edges, eyes, highlights), and
    that error ranks as high as a defect in the map. ``None`` (default) is the plain mean.

    ``groups`` (``forward``; ``[B]`` integer labels, optional): with hard mining, each group of
    images is mined on its own (its own quantile per scale) and the group means are averaged
    weighted by the groups' image counts. Why: in a batch that mixes clean and synthetic-anomaly
    images, the synthetic defects are the hardest pixels and take nearly all of a shared hard
    share, so the clean images' normal fine detail falls back to the easy weight. The plain mean
    is the same with or without groups (every image has the same number of pixels).
    """

    def __init__(self, eps: float = 1e-8, backend: str = "auto", hard_quantile: float | None = None, easy_weight: float = 0.1) -> None:
        super().__init__()
        check_backend_name(backend)
        if hard_quantile is not None and (isinstance(hard_quantile, bool) or not isinstance(hard_quantile, (int, float)) or not 0.0 < hard_quantile < 1.0):
            raise ValueError(f"hard_quantile must be None or a number in (0, 1), got {hard_quantile!r}")
        if isinstance(easy_weight, bool) or not isinstance(easy_weight, (int, float)) or not 0.0 <= easy_weight <= 1.0:
            raise ValueError(f"easy_weight must be a number in [0, 1], got {easy_weight!r}")
        self.eps = eps
        self.backend = backend
        self.hard_quantile = None if hard_quantile is None else float(hard_quantile)
        self.easy_weight = float(easy_weight)

    def forward(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor], groups: torch.Tensor | None = None) -> torch.Tensor:
        check_level_lists(feats_a, feats_b)
        n = feats_a[0].shape[0]
        members = None if groups is None else self._group_members(groups, n)
        dists = (cosine_distance(a, b, eps=self.eps, backend=self.backend) for a, b in zip(feats_a, feats_b))
        if self.hard_quantile is None:
            return sum(d.mean() for d in dists)
        if members is None:
            return sum(self._hard_mean(d) for d in dists)
        return sum(sum(self._hard_mean(d[idx]) * (idx.numel() / n) for idx in members) for d in dists)

    @staticmethod
    def _group_members(groups: torch.Tensor, batch: int) -> list[torch.Tensor]:
        """The batch indices of each group, from ``groups [B]`` integer labels."""
        groups = torch.as_tensor(groups)
        if groups.shape != (batch,) or groups.is_floating_point() or groups.dtype == torch.bool:
            raise ValueError(f"groups must be an integer tensor of shape [{batch}] (one label per image), got {groups.dtype} {tuple(groups.shape)}")
        return [torch.nonzero(groups == g).flatten() for g in torch.unique(groups)]

    def _hard_mean(self, dist: torch.Tensor) -> torch.Tensor:
        """Weighted mean of one scale's distances: weight 1 at or above the quantile, ``easy_weight`` below."""
        flat = dist.detach().flatten()
        # kthvalue has no size limit (torch.quantile refuses inputs above 2**24 elements); the
        # k-th smallest is the lower ``hard_quantile`` quantile.
        k = min(max(int(math.ceil(self.hard_quantile * flat.numel())), 1), flat.numel())
        threshold = flat.kthvalue(k).values
        weight = torch.where(dist.detach() >= threshold, 1.0, self.easy_weight).to(dist.dtype)
        return (dist * weight).sum() / weight.sum()

    def extra_repr(self) -> str:
        return "" if self.hard_quantile is None else f"hard_quantile={self.hard_quantile}, easy_weight={self.easy_weight}"
