"""Fixed 2-D sinusoidal position codes for token grids (transformer inputs, RLR's references)."""

from __future__ import annotations

import math

import torch

__all__ = ["sine_position_code_2d"]


def sine_position_code_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """A fixed ``[height, width, dim]`` code: half the channels encode the column, half the row.

    Within each half, channel pairs ``(2i, 2i+1)`` hold ``sin(p·f_i)`` and ``cos(p·f_i)`` of the
    integer position ``p`` at frequencies ``f_i = temperature ** (-4i / dim)`` (the 1-D
    transformer code of Vaswani et al. per axis). The first half is the column (x), the second
    the row (y). ``dim`` must be a positive multiple of 4.
    """
    for name, value in (("height", height), ("width", width), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 (sin and cos for each of two axes), got {dim}")
    half = dim // 2
    freqs = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(temperature) / half))  # [half/2]

    def axis_code(n: int) -> torch.Tensor:  # [n, half]: sin/cos interleaved
        angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None, :]
        return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(n, half)

    cols = axis_code(width)[None, :, :].expand(height, width, half)
    rows = axis_code(height)[:, None, :].expand(height, width, half)
    return torch.cat([cols, rows], dim=-1).to(torch.float32).contiguous()
