"""Windowed attention on a token grid: each query sees the keys inside (or outside) a window.

``local_attention(q, k, v, window, mode)`` is DESIGN.md contract 5. RLR's local cross attention
(``mode="inside"``: each query attends to the reference tokens in a window around it) and the
neighbour-masked attention of UniAD / DualAD and RLR's masked learnable-key attention
(``mode="outside"``: everything except that window) are both this op. One module holds the
whole op: the dense reference, the Triton forward and backward kernels, autograd and dispatch.

Window and borders. ``window = (w_h, w_w)`` (odd), radii ``r = w // 2``. Query ``(i, j)``'s
window is ``{(i', j'): |i - i'| <= r_h and |j - j'| <= r_w}`` intersected with the grid:
truncated at the borders, never padded, clamped or shifted, so a corner query has fewer keys.
For a 3×3 window on a 4×5 grid (``x`` = query, ``#`` = its window, ``.`` = the rest)::

    query (0, 0), corner     query (1, 2), interior     query (3, 4), corner
      x # . . .                . # # # .                  . . . . .
      # # . . .                . # x # .                  . . . . .
      . . . . .                . # # # .                  . . . # #
      . . . . .                . . . . .                  . . . # x

``mode="inside"`` attends over the ``#``/``x`` cells (4, 9 and 4 keys above), ``mode="outside"``
over the ``.`` cells. A window may be as large as ``2·size - 1``, which covers the whole grid
from every query; in ``"outside"`` mode a query whose window covers the whole grid has no keys
at all, and its output is defined as **0** (no NaN, zero gradient).

Kernels (flash-attention style, no ``HW×HW`` matrix in memory). The grid is flattened to
``L = H·W`` tokens, row-major. A program owns ``BLOCK_M`` queries of one (batch, head) and keeps
a running max, running sum and rescaled fp32 accumulator (online softmax) over key tiles of
``BLOCK_N`` tokens. The key tiles that can meet a query block's windows lie in the rows
``[row_min - r_h, row_max + r_h]``: ``"inside"`` visits only those (and skips any whose
columns are out of reach); ``"outside"`` visits every tile, needs the per-element window test
only on those, and skips a tile when its keys are in every query's window (bounds from the
tiles' row/column spans). The forward stores the
log-sum-exp per query; the backward is FlashAttention-2: ``delta = rowsum(dO·O)``, one kernel
for ``dK, dV`` (query tiles per key tile; with ``k, v`` broadcast from batch 1 it also loops
over the batch, so the reduction is deterministic and atomics-free), one for ``dQ``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

import torch
import torch.nn.functional as F

from fastuad.ops._dispatch import HAS_TRITON, is_exporting, select_backend, standard_backends
from fastuad.ops._validate import check_positive_float, check_tensor, out_dtype
from fastuad.ops._compile import CompileTarget, signature
from fastuad.ops._launch import (
    cdiv,
    dot_precision,
    gpu_dot_precision,
    interpreter_tiles,
    launch_arch,
    next_power_of_2,
    sm8x_tiles,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "local_attention",
    "local_attention_reference",
    "local_attention_sdpa",
    "window_mask",
    "parse_window",
    "MODES",
    "LOCAL_ATTENTION_BACKENDS",
    "attention_blocks",
    "compile_targets",
]

MODES = ("inside", "outside")
MODE_IDS = {"inside": 1, "outside": 2}  # the kernels' MASK codes; 0 = bounds only
MAX_HEAD_DIM = 64  # 64x64 tiles; 64x32 tiles for wider heads blew the dK/dV kernel up to an 8 KB stack (sm_90)
LOG2E = math.log2(math.e)  # exp(x) = exp2(x · log2 e): the kernels work in base 2


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def parse_window(window: object, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """``window`` as an (odd, odd) pair; with ``grid = (H, W)`` also checks ``w <= 2·size - 1``."""
    pair = (window, window) if isinstance(window, int) and not isinstance(window, bool) else window
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or any(isinstance(w, bool) or not isinstance(w, int) for w in pair):
        raise TypeError(f"window must be an odd int or a pair of odd ints (window_h, window_w), got {window!r}")
    for w in pair:
        if w <= 0 or w % 2 == 0:
            raise ValueError(f"window must be positive and odd in each dimension, got {window!r}")
    if grid is not None:
        for w, n, axis in zip(pair, grid, ("height", "width")):
            if w > 2 * n - 1:
                raise ValueError(f"window {tuple(pair)} is larger than 2*{axis}-1 = {2 * n - 1} for a {grid[0]}x{grid[1]} grid")
    return int(pair[0]), int(pair[1])


def check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _check_inputs(q, k, v, window, mode, scale) -> tuple[tuple[int, int], str, float]:
    """Validate contract 5's arguments; returns (radii, mode, scale)."""
    hint = "[B, H, W, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 5, hint)
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, W, heads, d = q.shape
    if k.shape[1:3] != q.shape[1:3]:
        raise ValueError(f"k and v must have the grid (H, W) = {(H, W)} of q, got {tuple(k.shape[1:3])}")
    if k.shape[3] != heads:
        raise ValueError(f"k and v must have q's number of heads {heads}, got {k.shape[3]}")
    if k.shape[4] != d:
        raise ValueError(f"k and v must have q's head dim {d}, got {k.shape[4]}")
    if k.shape[0] not in (1, B):
        raise ValueError(f"k and v batch must be 1 (broadcast) or q's batch {B}, got {k.shape[0]}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    w_h, w_w = parse_window(window, (H, W))
    mode = check_mode(mode)
    scale = d**-0.5 if scale is None else check_positive_float("scale", scale)
    return (w_h // 2, w_w // 2), mode, scale


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def window_mask(grid: tuple[int, int], window: int | tuple[int, int], mode: str = "inside", device=None) -> torch.Tensor:
    """Boolean ``[L, L]`` (``L = H·W``, row-major tokens): ``mask[query, key]`` is True where attended."""
    H, W = int(grid[0]), int(grid[1])
    r_h, r_w = (w // 2 for w in parse_window(window))
    if is_exporting():  # a constant [L, L] initializer in the graph, not index arithmetic
        rr, cc = np.divmod(np.arange(H * W), W)
        inside_np = (np.abs(rr[:, None] - rr[None, :]) <= r_h) & (np.abs(cc[:, None] - cc[None, :]) <= r_w)
        return torch.as_tensor(inside_np if check_mode(mode) == "inside" else ~inside_np, device=device)
    rows = torch.arange(H, device=device).repeat_interleave(W)
    cols = torch.arange(W, device=device).repeat(H)
    inside = ((rows[:, None] - rows[None, :]).abs() <= r_h) & ((cols[:, None] - cols[None, :]).abs() <= r_w)
    return inside if check_mode(mode) == "inside" else ~inside


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | tuple[int, int],
    mode: str = "inside",
    scale: float | None = None,
) -> torch.Tensor:
    """Dense masked attention: the full ``[L, L]`` score matrix, the window mask, a softmax.

    Computed in float32 (float64 stays); a query with no keys gets 0. Memory is O(B·heads·L²):
    this is the readable definition the kernels are tested against, not a fast path.
    """
    B, H, W, heads, d = q.shape
    scale = d**-0.5 if scale is None else scale
    dt = out_dtype(q.dtype)
    # [B, H, W, heads, d] -> [B, heads, L, d]
    qt, kt, vt = (t.to(dt).reshape(t.shape[0], H * W, heads, d).transpose(1, 2) for t in (q, k, v))
    mask = window_mask((H, W), window, mode, q.device)
    has_key = mask.any(dim=1, keepdim=True)
    scores = scale * qt @ kt.transpose(-1, -2)
    # Masked keys get -inf; a query without keys gets a finite row, zeroed after the softmax.
    fill = torch.where(has_key, float("-inf"), 0.0).to(dt)
    attn = torch.softmax(torch.where(mask, scores, fill), dim=-1) * mask
    out = attn @ vt
    return out.transpose(1, 2).reshape(B, H, W, heads, d)


@functools.lru_cache(maxsize=32)
def _window_bias(grid: tuple[int, int], window: tuple[int, int], mode: str, device: torch.device, dtype: torch.dtype):
    """Additive ``[L, L]`` bias (0 attended, -inf not) and ``[L, 1]`` has-key flags, cached per shape."""
    mask = window_mask(grid, window, mode, device)
    has_key = mask.any(dim=1, keepdim=True)
    # A query without keys attends everywhere (a finite softmax) and is zeroed afterwards.
    bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask & has_key, float("-inf"))
    return bias, has_key.to(dtype)


def local_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | tuple[int, int],
    mode: str = "inside",
    scale: float | None = None,
) -> torch.Tensor:
    """The ``"torch"`` backend: the reference's math through ``F.scaled_dot_product_attention``.

    Same key sets, scale, float32 compute (float64 stays) and zero output for queries without
    keys as :func:`local_attention_reference`, with the window as an additive ``-inf`` bias
    (cached per grid and window), so PyTorch's fused CPU/CUDA attention kernels run it, several
    times faster than the dense reference on a CPU. Memory is still O(L²) for the bias.
    """
    B, H, W, heads, d = q.shape
    scale = d**-0.5 if scale is None else scale
    dt = out_dtype(q.dtype)
    bias, has_key = _window_bias((H, W), parse_window(window), check_mode(mode), q.device, dt)
    qt, kt, vt = (t.to(dt).reshape(t.shape[0], H * W, heads, d).transpose(1, 2) for t in (q, k, v))
    if kt.shape[0] != B:  # a batch-1 reference: broadcast (autograd sums its gradient over the batch)
        kt, vt = kt.expand(B, -1, -1, -1), vt.expand(B, -1, -1, -1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=scale) * has_key
    return out.transpose(1, 2).reshape(B, H, W, heads, d)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _dot(a, b, FP64: tl.constexpr, PRECISION: tl.constexpr):
        """``a @ b`` accumulated in fp32; fp64 by broadcast-and-sum (exact, for gradcheck)."""
        if FP64:
            out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        else:
            out = tl.dot(a, b, input_precision=PRECISION)
        return out

    @triton.jit
    def _cdiv(a, b: tl.constexpr):
        return (a + b - 1) // b

    @triton.jit
    def _span(t0, BLOCK: tl.constexpr, L, W):
        """Row range and a superset of the column range of tokens ``[t0, min(t0 + BLOCK, L))``."""
        t1 = tl.minimum(t0 + BLOCK, L) - 1
        r0 = t0 // W
        r1 = t1 // W
        one_row = r0 == r1
        c0 = tl.where(one_row, t0 % W, 0)
        c1 = tl.where(one_row, t1 % W, W - 1)
        return r0, r1, c0, c1

    @triton.jit
    def _band(t0, BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr, L, H, W, R_H):
        """Tokens ``[lo, hi)`` of the other side whose rows lie within ``R_H`` rows of this block's.

        ``lo`` is rounded down to a multiple of ``BLOCK_OTHER``: tiles start aligned.
        """
        r0, r1, c0, c1 = _span(t0, BLOCK, L, W)
        lo = tl.maximum(r0 - R_H, 0) * W
        hi = (tl.minimum(r1 + R_H, H - 1) + 1) * W
        return (lo // BLOCK_OTHER) * BLOCK_OTHER, hi

    @triton.jit
    def _tile_needed(a0, BLOCK_A: tl.constexpr, b0, BLOCK_B: tl.constexpr, L, W, R_H, R_W, MASK: tl.constexpr):
        """False when the tile pair provably contributes nothing (from row/column spans).

        inside: no pair can be within the window; outside: every pair is within the window.
        """
        ar0, ar1, ac0, ac1 = _span(a0, BLOCK_A, L, W)
        br0, br1, bc0, bc1 = _span(b0, BLOCK_B, L, W)
        if MASK == 1:
            far = (tl.maximum(br0 - ar1, ar0 - br1) > R_H) | (tl.maximum(bc0 - ac1, ac0 - bc1) > R_W)
            needed = far == 0
        elif MASK == 2:
            all_in = (tl.maximum(br1 - ar0, ar1 - br0) <= R_H) & (tl.maximum(bc1 - ac0, ac1 - bc0) <= R_W)
            needed = all_in == 0
        else:
            needed = a0 >= 0
        return needed

    @triton.jit
    def _keep(ta, tb, b_ok, W, R_H, R_W, MASK: tl.constexpr):
        """``[len(ta), len(tb)]`` pairs that are attended: valid ``tb`` and the window test.

        The window test is symmetric, so the same helper serves query-major and key-major tiles.
        """
        keep = b_ok[None, :] & (ta >= 0)[:, None]
        if MASK != 0:
            ia = ta // W
            ib = tb // W
            inside = (tl.abs(ia[:, None] - ib[None, :]) <= R_H) & (tl.abs((ta - ia * W)[:, None] - (tb - ib * W)[None, :]) <= R_W)
            if MASK == 1:
                keep = keep & inside
            else:
                keep = keep & (inside == 0)
        return keep

    @triton.jit
    def _fwd_range(
        acc, m_i, l_i, q, offs_m, start_m, k_base, v_base, n_lo, n_hi,
        L, W, TOK, D, R_H, R_W, qk_scale,
        MASK: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Online-softmax update of one query block over the key tiles ``[n_lo, n_hi)``."""
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        for start_n in range(n_lo, n_hi, BLOCK_N):
            if _tile_needed(start_m, BLOCK_M, start_n, BLOCK_N, L, W, R_H, R_W, MASK):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_ok = offs_n < L
                kt = tl.load(k_base + offs_n[None, :] * TOK + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                s = _dot(q, kt, FP64, PRECISION) * qk_scale  # log2 units
                s = tl.where(_keep(offs_m, offs_n, n_ok, W, R_H, R_W, MASK), s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(v_base + offs_n[:, None] * TOK + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP64, PRECISION)
                m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
        L, H, W, NH, D, KV_BATCH_STRIDE, R_H, R_W, qk_scale,
        MODE: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of ``BLOCK_M`` queries of one (batch, head): output and log-sum-exp (base 2)."""
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = (bh // NH).to(tl.int64)
        h = bh % NH
        TOK = NH * D
        q_base = q_ptr + b * L * TOK + h * D
        k_base = k_ptr + b * KV_BATCH_STRIDE + h * D
        v_base = v_ptr + b * KV_BATCH_STRIDE + h * D
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < L
        io_mask = m_ok[:, None] & (offs_d < D)[None, :]
        q = tl.load(q_base + offs_m[:, None] * TOK + offs_d[None, :], mask=io_mask, other=0.0)
        ACC = tl.float64 if FP64 else tl.float32
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        l_i = tl.zeros([BLOCK_M], dtype=ACC)
        lo, hi = _band(start_m, BLOCK_M, BLOCK_N, L, H, W, R_H)
        if MODE == 1:
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, offs_m, start_m, k_base, v_base, lo, hi, L, W, TOK, D, R_H, R_W, qk_scale,
                                       1, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        else:  # outside: far tiles need no window test, the band does
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, offs_m, start_m, k_base, v_base, 0, lo, L, W, TOK, D, R_H, R_W, qk_scale,
                                       0, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            hi = tl.minimum(_cdiv(hi, BLOCK_N) * BLOCK_N, L)
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, offs_m, start_m, k_base, v_base, lo, hi, L, W, TOK, D, R_H, R_W, qk_scale,
                                       2, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, offs_m, start_m, k_base, v_base, hi, L, L, W, TOK, D, R_H, R_W, qk_scale,
                                       0, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        empty = l_i == 0.0  # outside mode, window covering the whole grid: output 0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, 0.0, m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(o_ptr + b * L * TOK + h * D + offs_m[:, None] * TOK + offs_d[None, :], out, mask=io_mask)
        tl.store(lse_ptr + bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)

    @triton.jit
    def _dq_range(
        dq, q, do, lse, delta, offs_m, start_m, k_base, v_base, n_lo, n_hi,
        L, W, TOK, D, R_H, R_W, qk_scale,
        MASK: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """``dS·K`` of one query block over the key tiles ``[n_lo, n_hi)``."""
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        for start_n in range(n_lo, n_hi, BLOCK_N):
            if _tile_needed(start_m, BLOCK_M, start_n, BLOCK_N, L, W, R_H, R_W, MASK):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_ok = offs_n < L
                t_mask = n_ok[None, :] & d_ok[:, None]
                kt = tl.load(k_base + offs_n[None, :] * TOK + offs_d[:, None], mask=t_mask, other=0.0)
                vt = tl.load(v_base + offs_n[None, :] * TOK + offs_d[:, None], mask=t_mask, other=0.0)
                s = _dot(q, kt, FP64, PRECISION) * qk_scale
                keep = _keep(offs_m, offs_n, n_ok, W, R_H, R_W, MASK)
                p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
                dp = _dot(do, vt, FP64, PRECISION)
                ds = p * (dp - delta[:, None])
                dq += _dot(ds.to(q.dtype), tl.trans(kt), FP64, PRECISION)
        return dq

    @triton.jit
    def _bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        L, H, W, NH, D, KV_BATCH_STRIDE, R_H, R_W, qk_scale, scale,
        MODE: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """dQ for one query block: the forward's key-tile schedule, recomputing P from the LSE."""
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = (bh // NH).to(tl.int64)
        h = bh % NH
        TOK = NH * D
        q_off = b * L * TOK + h * D
        k_base = k_ptr + b * KV_BATCH_STRIDE + h * D
        v_base = v_ptr + b * KV_BATCH_STRIDE + h * D
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < L
        io_mask = m_ok[:, None] & (offs_d < D)[None, :]
        io = q_off + offs_m[:, None] * TOK + offs_d[None, :]
        q = tl.load(q_ptr + io, mask=io_mask, other=0.0)
        do = tl.load(do_ptr + io, mask=io_mask, other=0.0).to(q.dtype)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64 if FP64 else tl.float32)
        lo, hi = _band(start_m, BLOCK_M, BLOCK_N, L, H, W, R_H)
        if MODE == 1:
            dq = _dq_range(dq, q, do, lse, delta, offs_m, start_m, k_base, v_base, lo, hi, L, W, TOK, D, R_H, R_W, qk_scale,
                           1, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        else:
            dq = _dq_range(dq, q, do, lse, delta, offs_m, start_m, k_base, v_base, 0, lo, L, W, TOK, D, R_H, R_W, qk_scale,
                           0, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            hi = tl.minimum(_cdiv(hi, BLOCK_N) * BLOCK_N, L)
            dq = _dq_range(dq, q, do, lse, delta, offs_m, start_m, k_base, v_base, lo, hi, L, W, TOK, D, R_H, R_W, qk_scale,
                           2, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            dq = _dq_range(dq, q, do, lse, delta, offs_m, start_m, k_base, v_base, hi, L, L, W, TOK, D, R_H, R_W, qk_scale,
                           0, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        tl.store(dq_ptr + io, (dq * scale).to(dq_ptr.dtype.element_ty), mask=io_mask)

    @triton.jit
    def _dkv_range(
        dk, dv, k, v, offs_n, start_n, q_base, do_base, lse_base, delta_base, m_lo, m_hi,
        L, W, TOK, D, R_H, R_W, qk_scale,
        MASK: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """``dK``, ``dV`` of one key tile over the query tiles ``[m_lo, m_hi)`` (key-major: ``[N, M]``)."""
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        for start_m in range(m_lo, m_hi, BLOCK_M):
            if _tile_needed(start_n, BLOCK_N, start_m, BLOCK_M, L, W, R_H, R_W, MASK):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                m_ok = offs_m < L
                io_mask = m_ok[:, None] & d_ok[None, :]
                io = offs_m[:, None] * TOK + offs_d[None, :]
                q = tl.load(q_base + io, mask=io_mask, other=0.0)
                do = tl.load(do_base + io, mask=io_mask, other=0.0).to(q.dtype)
                lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
                st = _dot(k, tl.trans(q), FP64, PRECISION) * qk_scale
                keep = _keep(offs_n, offs_m, m_ok, W, R_H, R_W, MASK)
                pt = tl.where(keep, tl.exp2(st - lse[None, :]), 0.0)
                dv += _dot(pt.to(q.dtype), do, FP64, PRECISION)
                dpt = _dot(v, tl.trans(do), FP64, PRECISION)
                dst = pt * (dpt - delta[None, :])
                dk += _dot(dst.to(q.dtype), q, FP64, PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_dkv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        L, H, W, NH, D, Q_PER_KV, R_H, R_W, qk_scale, scale,
        MODE: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """dK, dV for one key tile of one (kv batch, head), summed over the ``Q_PER_KV`` query batches.

        ``Q_PER_KV`` is B when ``k, v`` were broadcast from batch 1, else 1: the batch reduction
        happens in registers, in a fixed order (deterministic).
        """
        start_n = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1)
        kb = (bh // NH).to(tl.int64)
        h = bh % NH
        TOK = NH * D
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < L
        kv_mask = n_ok[:, None] & (offs_d < D)[None, :]
        kv = kb * L * TOK + h * D + offs_n[:, None] * TOK + offs_d[None, :]
        k = tl.load(k_ptr + kv, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv, mask=kv_mask, other=0.0)
        ACC = tl.float64 if FP64 else tl.float32
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        lo, hi = _band(start_n, BLOCK_N, BLOCK_M, L, H, W, R_H)
        hi_al = tl.minimum(_cdiv(hi, BLOCK_M) * BLOCK_M, L)
        for i in range(0, Q_PER_KV):
            b = kb * Q_PER_KV + i
            q_base = q_ptr + b * L * TOK + h * D
            do_base = do_ptr + b * L * TOK + h * D
            stat = (b * NH + h) * L
            if MODE == 1:
                dk, dv = _dkv_range(dk, dv, k, v, offs_n, start_n, q_base, do_base, lse_ptr + stat, delta_ptr + stat,
                                    lo, hi, L, W, TOK, D, R_H, R_W, qk_scale, 1, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            else:
                dk, dv = _dkv_range(dk, dv, k, v, offs_n, start_n, q_base, do_base, lse_ptr + stat, delta_ptr + stat,
                                    0, lo, L, W, TOK, D, R_H, R_W, qk_scale, 0, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
                dk, dv = _dkv_range(dk, dv, k, v, offs_n, start_n, q_base, do_base, lse_ptr + stat, delta_ptr + stat,
                                    lo, hi_al, L, W, TOK, D, R_H, R_W, qk_scale, 2, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
                dk, dv = _dkv_range(dk, dv, k, v, offs_n, start_n, q_base, do_base, lse_ptr + stat, delta_ptr + stat,
                                    hi_al, L, L, W, TOK, D, R_H, R_W, qk_scale, 0, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        tl.store(dk_ptr + kv, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + kv, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------------------------
# Launchers and autograd
# --------------------------------------------------------------------------------------------


ATTN_KERNELS = ("fwd", "dq", "dkv")


def attention_blocks(
    dtype: torch.dtype, head_dim: int, gpu: bool | None = None, kernel: str = "fwd", arch: int | None = None
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``kernel`` in ``"fwd"``, ``"dq"``, ``"dkv"``
    on a GPU of ``arch`` (compute capability as ``major * 10 + minor``, see
    :func:`fastuad.ops._launch.launch_arch`; None means sm_90).

    Not tuned on a GPU yet (no sweep on file). sm_90 (and None): 64×64 tiles, the
    FlashAttention-2 tutorial's choice for head dims up to 64 (the Triton limit, MAX_HEAD_DIM);
    16×16 for float64 (its products are broadcast-and-sum in registers). float32 products use
    3xTF32, which holds each operand as two tf32 halves: at 64×64 all three kernels spilled on
    sm_90 (up to 704 B), so float32 takes 64×32 tiles (forward, dQ: 64 queries against 32-key
    tiles) and 16×64 with 8 warps for dK/dV (64 keys against 16-query tiles), which compile
    without a stack frame at d=32 (``python -m fastuad.ops.compile_check --module local_attn``).

    sm_8x (A100, consumer Ampere/Ada): the sm_90 launches spilled on sm_80 (Triton 3.8: 16-bit
    dK/dV 16 B, float32 dK/dV 16 B, float32 dQ 144-352 B), so there 16-bit inputs keep 64×64
    tiles with 8 warps for all three kernels, and float32 takes 64×32 with 8 warps (forward),
    16×32 with 8 warps (dQ: 16 queries against 32-key tiles) and 16×16 with 4 warps (dK/dV):
    0 stack bytes at d=32 (at d=64 some still spill, less than with the sm_90 tiles). These sm_8x tiles were
    chosen for zero spills by the compile check (``--arch 80``), not tuned for speed on an A100
    (none was available).

    The interpreter gets 16×16 so that small test grids still span several tiles. ``gpu=None``
    follows the process (interpreter tiles unless :func:`fastuad.ops._launch.gpu_tiles` is
    active); ``True`` is what a GPU launch uses.
    """
    if kernel not in ATTN_KERNELS:
        raise ValueError(f"kernel must be one of {ATTN_KERNELS}, got {kernel!r}")
    if gpu is None:
        gpu = not interpreter_tiles()
    if not gpu or dtype == torch.float64:
        return 16, 16, 4, 1
    if sm8x_tiles(arch):
        if dtype == torch.float32:
            return {"fwd": (64, 32, 8, 2), "dq": (16, 32, 8, 2), "dkv": (16, 16, 4, 2)}[kernel]
        return 64, 64, 8, 2
    if dtype == torch.float32:
        return (16, 64, 8, 2) if kernel == "dkv" else (64, 32, 4, 2)
    return 64, 64, 4, 2


def _launch_meta(q: torch.Tensor, mode: str, blocks: tuple[int, int] | None, kernel: str = "fwd") -> dict:
    B, H, W, NH, D = q.shape
    block_m, block_n, warps, stages = attention_blocks(q.dtype, D, kernel=kernel, arch=launch_arch(q.device))
    if blocks is not None:
        block_m, block_n = blocks
    # One rule for every op (fastuad.ops._launch.dot_precision_for); float64 does not use tl.dot.
    precision = dot_precision(q.device, q.dtype)
    return dict(
        MODE=MODE_IDS[mode], FP64=q.dtype == torch.float64, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_power_of_2(D)), num_warps=warps, num_stages=stages,
    )


def local_attention_triton_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, radii: tuple[int, int], mode: str, scale: float,
    blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, H, W, heads, d]`` (float32; float64 stays) and the base-2 LSE ``[B, heads, L]``.

    Inputs must be contiguous. ``blocks = (BLOCK_M, BLOCK_N)`` overrides the tile sizes (tests).
    """
    B, H, W, NH, D = q.shape
    L = H * W
    dt = out_dtype(q.dtype)
    o = torch.empty(q.shape, device=q.device, dtype=dt)
    lse = torch.empty((B, NH, L), device=q.device, dtype=dt)
    meta = _launch_meta(q, mode, blocks)
    kv_stride = 0 if k.shape[0] == 1 else L * NH * D
    grid = (cdiv(L, meta["BLOCK_M"]), B * NH)
    _fwd_kernel[grid](q, k, v, o, lse, L, H, W, NH, D, kv_stride, radii[0], radii[1], scale * LOG2E, **meta)
    return o, lse


def local_attention_triton_backward(
    q, k, v, o, lse, grad, radii: tuple[int, int], mode: str, scale: float,
    need_q: bool = True, need_kv: bool = True, blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dQ (q's shape and dtype) and dK, dV (k's shape and dtype; summed over q's batch when k has batch 1)."""
    B, H, W, NH, D = q.shape
    Bk, L = k.shape[0], H * W
    grad = grad.contiguous()
    # delta = rowsum(dO · O) per query: the softmax-Jacobian term of FlashAttention-2's backward.
    delta = (grad.to(o.dtype) * o).sum(-1).reshape(B, L, NH).transpose(1, 2).contiguous()
    common = (L, H, W, NH, D)
    dq = dk = dv = None
    if need_q:
        dq = torch.empty_like(q)
        meta = _launch_meta(q, mode, blocks, "dq")
        kv_stride = 0 if Bk == 1 else L * NH * D
        grid = (cdiv(L, meta["BLOCK_M"]), B * NH)
        _bwd_dq_kernel[grid](
            q, k, v, grad, lse, delta, dq, *common, kv_stride, radii[0], radii[1], scale * LOG2E, scale, **meta
        )
    if need_kv:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        meta = _launch_meta(q, mode, blocks, "dkv")
        grid = (cdiv(L, meta["BLOCK_N"]), Bk * NH)
        _bwd_dkv_kernel[grid](
            q, k, v, grad, lse, delta, dk, dv, *common, B // Bk, radii[0], radii[1], scale * LOG2E, scale, **meta
        )
    return dq, dk, dv


class _LocalAttentionTriton(torch.autograd.Function):
    """Autograd wrapper: the forward saves O and the LSE; the backward recomputes P tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, radii, mode, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = local_attention_triton_forward(q, k, v, radii, mode, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (radii, mode, scale)
        return o

    @staticmethod
    def backward(ctx, grad):
        q, k, v, o, lse = ctx.saved_tensors
        need_q = ctx.needs_input_grad[0]
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = local_attention_triton_backward(q, k, v, o, lse, grad, *ctx.args, need_q=need_q, need_kv=need_kv)
        return dq, dk, dv, None, None, None


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile targets
# --------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# (workload, grid (H, W), head dim, modes, dtypes, hot): DESIGN.md's localattn benchmark (also
# with k, v broadcast from batch 1), then RLR (32x32 / 16x16 grids, width 256 / 512 with 8
# heads, inside and outside against a batch-1 reference) and DualAD (14x14, d=32, outside).
_ATTN_WORKLOADS = (
    ("bench localattn B=32 32x32 8 heads d=32 window 7", (32, 32), 32, MODES, (torch.float16, torch.float32), True),
    ("rlr 32x32 / 16x16, width 256 (d=32)", (32, 32), 32, MODES, (torch.bfloat16,), False),
    ("rlr 32x32 / 16x16, width 512 (d=64)", (32, 32), 64, MODES, (torch.float16, torch.bfloat16, torch.float32), False),
    ("dualad 14x14 d=32 window 7 outside", (14, 14), 32, ("outside",), (torch.float16, torch.bfloat16, torch.float32), False),
)


def compile_targets(arch: int | None = None) -> list[CompileTarget]:
    """Forward, dQ and dK/dV kernels at every launch configuration on a GPU of ``arch``
    (``major * 10 + minor``; None: sm_90) for the benchmark and the models' shapes (the kernels
    take the batch-1 broadcast as a runtime stride / loop count)."""
    targets: dict[tuple, CompileTarget] = {}
    for workload, (h, w), d, modes, dtypes, hot in _ATTN_WORKLOADS:
        for dtype in dtypes:
            block_d = max(16, next_power_of_2(d))
            el = "*" + _TRITON_TYPES[dtype]
            dims = dict(L=h * w, H=h, W=w, NH=8, D=d)
            ints = {n: "i32" for n in ("L", "H", "W", "NH", "D", "R_H", "R_W")}
            aligned_ints = tuple(n for n, v in dims.items() if v % 16 == 0)
            kernels = (
                (_fwd_kernel, "fwd", "fwd", dict(q_ptr=el, k_ptr=el, v_ptr=el, o_ptr="*fp32", lse_ptr="*fp32",
                                                 KV_BATCH_STRIDE="i32", qk_scale="fp32", **ints)),
                (_bwd_dq_kernel, "dq", "bwd-dq", dict(q_ptr=el, k_ptr=el, v_ptr=el, do_ptr="*fp32", lse_ptr="*fp32",
                                                      delta_ptr="*fp32", dq_ptr=el, KV_BATCH_STRIDE="i32",
                                                      qk_scale="fp32", scale="fp32", **ints)),
                (_bwd_dkv_kernel, "dkv", "bwd-dkv", dict(q_ptr=el, k_ptr=el, v_ptr=el, do_ptr="*fp32", lse_ptr="*fp32",
                                                         delta_ptr="*fp32", dk_ptr=el, dv_ptr=el, Q_PER_KV="i32",
                                                         qk_scale="fp32", scale="fp32", **ints)),
            )
            for mode in modes:
                for kernel, role, label, types in kernels:
                    block_m, block_n, warps, stages = attention_blocks(dtype, d, gpu=True, kernel=role, arch=arch)
                    consts = dict(MODE=MODE_IDS[mode], FP64=False, PRECISION=gpu_dot_precision(dtype, arch),
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
                    aligned = tuple(n for n, t in types.items() if t.startswith("*")) + aligned_ints
                    key = (label, dtype, mode, block_m, block_n, block_d, warps, stages, aligned)
                    if key in targets:
                        continue
                    targets[key] = CompileTarget(
                        kernel=kernel, signature=signature(kernel, types, consts), constexprs=consts,
                        num_warps=warps, num_stages=stages,
                        config=f"{label} {_TRITON_TYPES[dtype]} {mode} {block_m}x{block_n} d{block_d} w{warps} s{stages}"
                        + ("" if aligned_ints == ("L", "H", "W", "D") or "L" in aligned_ints else f" grid {h}x{w}"),
                        workload=workload, hot=hot, divisible_by_16=aligned,
                    )
    return list(targets.values())


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def _run_torch(q, k, v, radii, mode, scale):
    return local_attention_sdpa(q, k, v, (2 * radii[0] + 1, 2 * radii[1] + 1), mode, scale)


def _triton_reasons(tensors, **_) -> list[str]:
    d = tensors[0].shape[-1]
    if d > MAX_HEAD_DIM:
        return [f"triton's 64x64 tiles take head dims up to {MAX_HEAD_DIM} (wider ones spill registers), got {d}"]
    return []


LOCAL_ATTENTION_BACKENDS = standard_backends(_run_torch, _LocalAttentionTriton.apply, check=_triton_reasons)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | tuple[int, int],
    mode: str = "inside",
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of each grid position over the keys inside (or outside) a window around it.

    Args:
        q: queries ``[B, H, W, heads, d]``.
        k, v: keys and values ``[B or 1, H, W, heads, d]``; batch 1 broadcasts over q's batch
            (a learnable reference) and their gradients are summed over it.
        window: odd int or ``(odd, odd)`` (height, width), at most ``2·size - 1``; truncated at
            the borders (see the module docstring for a picture).
        mode: ``"inside"`` (keys within the window) or ``"outside"`` (all other keys; a query
            with none gets 0).
        scale: softmax scale of ``q·k``, default ``d ** -0.5``.
        backend: ``"auto"``, ``"torch"`` (:func:`local_attention_sdpa`: the dense reference's
            math through PyTorch's fused attention) or ``"triton"``.

    Returns:
        ``[B, H, W, heads, d]`` float32 (float64 for float64 inputs), differentiable in q, k, v.
    """
    radii, mode, scale = _check_inputs(q, k, v, window, mode, scale)
    impl = select_backend("local_attention", backend, LOCAL_ATTENTION_BACKENDS, (q, k, v))
    return impl.fn(q, k, v, radii, mode, scale)

