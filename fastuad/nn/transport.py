"""Entropic optimal transport between point clouds (the Sinkhorn divergence), for RD++/DM-GRD.

:func:`sinkhorn_divergence` is the debiased entropic OT cost between two uniformly weighted
point clouds with the cost ``|x - y|^2 / 2`` and ``eps = blur^2``:
``S(x, y) = OT(x, y) - OT(x, x)/2 - OT(y, y)/2`` (Feydy et al. 2019, geomloss' default
``loss="sinkhorn", p=2``). It is 0 when the two clouds are equal and positive otherwise, and
differentiable through a fixed number of log-domain Sinkhorn iterations.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sinkhorn_divergence"]


def _entropic_ot(x: torch.Tensor, y: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    cost = torch.cdist(x, y).pow(2) / 2  # [N, M]
    log_a = torch.full((x.shape[0],), -math.log(x.shape[0]), dtype=x.dtype, device=x.device)
    log_b = torch.full((y.shape[0],), -math.log(y.shape[0]), dtype=x.dtype, device=x.device)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(iters):
        f = -eps * torch.logsumexp(log_b[None, :] + (g[None, :] - cost) / eps, dim=1)
        g = -eps * torch.logsumexp(log_a[:, None] + (f[:, None] - cost) / eps, dim=0)
    return f.mean() + g.mean()


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, blur: float = 0.05, iters: int = 20) -> torch.Tensor:
    """Debiased Sinkhorn divergence between the rows of ``x [N, D]`` and ``y [M, D]`` (scalar)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError(f"x and y must be [N, D] and [M, D] with N, M >= 1, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not blur > 0 or iters < 1:
        raise ValueError(f"blur must be > 0 and iters >= 1, got {blur!r}, {iters!r}")
    x, y = x.float(), y.float()
    eps = blur**2
    return _entropic_ot(x, y, eps, iters) - 0.5 * _entropic_ot(x, x, eps, iters) - 0.5 * _entropic_ot(y, y, eps, iters)
