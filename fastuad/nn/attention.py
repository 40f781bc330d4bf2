"""Multi-head windowed attention layers on token grids, built on :func:`fastuad.ops.local_attn`.

* :class:`LocalCrossAttention` (``mode="inside"``): RLR's local cross attention. Queries come
  from the input, keys and values from a reference (by default a learnable ``[1, H, W, C]``
  parameter the layer owns; a shared one can be passed to ``forward``), and each position
  attends only to the reference tokens in a window around it.
* :class:`NeighborMaskedAttention` (``mode="outside"``): the neighbour-masked attention of
  UniAD / DualAD (self or cross attention with the window around each query masked out) and
  RLR's masked learnable-key attention (``key=reference, value=x``).

Tokens are ``[B, H, W, C]`` (channels last); a ``[B, C, H, W]`` feature map is
``x.permute(0, 2, 3, 1)``. Key/value inputs may have batch 1 (a learnable reference): the op
broadcasts them and sums their gradients over the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from fastuad.ops._dispatch import check_backend_name
from fastuad.ops.local_attn import check_mode, local_attention, parse_window

__all__ = ["WindowAttention", "LocalCrossAttention", "NeighborMaskedAttention"]


class WindowAttention(nn.Module):
    """Multi-head attention with q/k/v/out projections where each query sees a window (or its complement).

    Args:
        dim: channels ``C`` of queries, keys, values and output.
        num_heads: heads; ``dim`` must be divisible by it.
        window: odd int or ``(odd, odd)``; see :mod:`fastuad.ops.local_attn` for borders.
        mode: ``"inside"`` or ``"outside"``.
        qkv_bias: biases on the q, k, v projections (the out projection always has one).
        backend: passed to :func:`fastuad.ops.local_attn`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int | tuple[int, int],
        mode: str = "inside",
        qkv_bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing dim={dim}, got {num_heads!r}")
        check_backend_name(backend)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = parse_window(window)
        self.mode = check_mode(mode)
        self.backend = backend
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def _check(self, name: str, t: torch.Tensor, grid: tuple[int, int] | None) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[-1] != self.dim:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be [B, H, W, {self.dim}] (channels last), got {shape}")
        if grid is not None and tuple(t.shape[1:3]) != grid:
            raise ValueError(f"{name} must have the query grid (H, W) = {grid}, got {tuple(t.shape[1:3])}")

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Project, attend per head, merge heads and project out: ``[B, H, W, C]``."""
        self._check("query", query, None)
        grid = tuple(query.shape[1:3])
        self._check("key", key, grid)
        self._check("value", value, grid)
        B, H, W, C = query.shape
        heads = (self.num_heads, self.head_dim)
        q = self.q_proj(query).view(B, H, W, *heads)
        k = self.k_proj(key).view(key.shape[0], H, W, *heads)
        v = self.v_proj(value).view(value.shape[0], H, W, *heads)
        if k.shape[0] != v.shape[0]:  # one of them is a batch-1 reference: the op wants equal batches
            batch = max(k.shape[0], v.shape[0])
            k, v = k.expand(batch, -1, -1, -1, -1), v.expand(batch, -1, -1, -1, -1)
        if k.dtype != q.dtype:  # e.g. an fp32 reference parameter with fp16 queries under autocast
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = local_attention(q, k, v, self.window, self.mode, self.scale, backend=self.backend)
        return self.out_proj(out.to(q.dtype).reshape(B, H, W, C))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window={self.window}, mode={self.mode!r}, "
            f"backend={self.backend!r}"
        )


class LocalCrossAttention(WindowAttention):
    """RLR's local cross attention: queries from ``x``, keys and values from a reference, inside a window.

    With ``grid_size=(H, W)`` the layer owns a learnable reference ``[1, H, W, dim]``
    (``self.reference``, truncated-normal init, std 0.02); ``forward(x, reference)`` can use
    another one instead (e.g. one shared with a :class:`NeighborMaskedAttention`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int | tuple[int, int],
        grid_size: int | tuple[int, int] | None = None,
        qkv_bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim, num_heads, window, "inside", qkv_bias, backend)
        if grid_size is None:
            self.reference = None
        else:
            h, w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
            self.reference = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, h, w, dim), std=0.02))

    def forward(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, H, W, C]``, ``reference [1 or B, H, W, C]`` (default: the layer's own) -> ``[B, H, W, C]``."""
        if reference is None:
            if self.reference is None:
                raise ValueError("reference must be given: this LocalCrossAttention was built without grid_size")
            reference = self.reference
        return self.attend(x, reference, reference)


class NeighborMaskedAttention(WindowAttention):
    """Attention over every key except those in a window around the query (UniAD / DualAD, RLR).

    ``forward(query, key=None, value=None)``: ``key`` defaults to ``query`` (self attention) and
    ``value`` to ``key``. RLR's masked learnable-key attention is ``forward(x, key=reference,
    value=x)``. A query whose window covers the whole grid has no keys and gets 0 before the
    output projection (i.e. the out projection's bias).
    """

    def __init__(
        self, dim: int, num_heads: int, window: int | tuple[int, int], qkv_bias: bool = True, backend: str = "auto"
    ) -> None:
        super().__init__(dim, num_heads, window, "outside", qkv_bias, backend)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        key = query if key is None else key
        value = key if value is None else value
        return self.attend(query, key, value)
