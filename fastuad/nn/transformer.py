"""Transformer layers on token grids whose attention masks out a window around each query.

The encoder and decoder layers of UniAD / DualAD: post-norm layers (``LN(x + sublayer(x))``)
whose every attention is :class:`~fastuad.nn.attention.NeighborMaskedAttention` (the window
around the query masked out, :func:`fastuad.ops.local_attention` with ``mode="outside"``), so no
layer ever builds an ``HW x HW`` mask. A position embedding, when given, is added to queries and
keys only (values stay the plain tokens), as in DETR / UniAD.

Tokens are channels last, ``[B, H, W, C]``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastuad.nn.attention import NeighborMaskedAttention

__all__ = ["LearnedPositionEmbedding2d", "FeedForward", "MaskedEncoderLayer", "MaskedDecoderLayer"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def _grid(grid_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise ValueError(f"grid_size must be a positive int or a pair of them, got {grid_size!r}")
    return h, w


class LearnedPositionEmbedding2d(nn.Module):
    """Learned absolute position code ``[1, H, W, dim]``: a column half and a row half.

    The first ``dim // 2`` channels depend on the column, the rest on the row (DETR's learned
    embedding, used by UniAD / DualAD); both are initialised uniformly in ``[0, 1)``.
    """

    def __init__(self, grid_size: int | tuple[int, int], dim: int) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even int, got {dim!r}")
        self.grid_size = _grid(grid_size)
        self.dim = dim
        h, w = self.grid_size
        self.row = nn.Parameter(torch.rand(h, dim // 2))
        self.col = nn.Parameter(torch.rand(w, dim // 2))

    def forward(self) -> torch.Tensor:
        h, w = self.grid_size
        cols = self.col[None, :, :].expand(h, w, -1)
        rows = self.row[:, None, :].expand(h, w, -1)
        return torch.cat([cols, rows], dim=-1)[None]

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, dim={self.dim}"


class FeedForward(nn.Module):
    """``Linear -> act -> dropout -> Linear -> dropout`` on the last dimension."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, activation: str = "relu", out_dim: int | None = None) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), _ACTIVATIONS[activation](), nn.Dropout(dropout), nn.Linear(hidden, out_dim or dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos.to(x.dtype)


class MaskedEncoderLayer(nn.Module):
    """``x = LN(x + Attn(x+pos, x+pos, x)); x = LN(x + FFN(x))``, the window around each query masked out.

    Args:
        dim: token width; num_heads: heads; ffn_dim: hidden width of the FFN;
        window: the masked-out neighbourhood (odd int or pair); dropout: on the attention and
        FFN outputs; activation: ``relu`` or ``gelu``; backend: for :func:`fastuad.ops.local_attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        window: int | tuple[int, int],
        dropout: float = 0.0,
        activation: str = "relu",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.attn = NeighborMaskedAttention(dim, num_heads, window, backend=backend)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout, activation)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, H, W, C]``, ``pos [1 or B, H, W, C]`` or ``None`` -> ``[B, H, W, C]``."""
        qk = _with_pos(x, pos)
        x = self.norm1(x + self.drop(self.attn(qk, qk, x)))
        return self.norm2(x + self.ffn(x))


class MaskedDecoderLayer(nn.Module):
    """A decoder layer with two neighbour-masked cross attentions and an FFN (UniAD / DualAD).

    ``forward(query, previous, memory, pos)``:
    ``x = LN(query + Attn1(query+pos, memory+pos, memory))`` (the query reads the encoder
    output), ``x = LN(x + Attn2(x+pos, previous+pos, previous))`` (then the previous decoder
    layer's output), ``x = LN(x + FFN(x))``. Arguments as :class:`MaskedEncoderLayer`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        window: int | tuple[int, int],
        dropout: float = 0.0,
        activation: str = "relu",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.attn1 = NeighborMaskedAttention(dim, num_heads, window, backend=backend)
        self.attn2 = NeighborMaskedAttention(dim, num_heads, window, backend=backend)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout, activation)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self, query: torch.Tensor, previous: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All ``[B, H, W, C]`` (``query`` may have batch 1: a learned query) -> ``[B, H, W, C]``."""
        if query.shape[0] != memory.shape[0]:
            query = query.expand(memory.shape[0], -1, -1, -1)
        mem_k = _with_pos(memory, pos)
        x = self.norm1(query + self.drop(self.attn1(_with_pos(query, pos), mem_k, memory)))
        x = self.norm2(x + self.drop(self.attn2(_with_pos(x, pos), _with_pos(previous, pos), previous)))
        return self.norm3(x + self.ffn(x))
