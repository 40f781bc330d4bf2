"""Exact k-nearest-neighbour search in a memory bank (PatchCore-style anomaly scoring).

``knn(query, bank, k)`` returns, for each query row, the ``k`` smallest Euclidean distances to
the bank's rows (ascending) and their int64 indices. A PatchCore bank holds hundreds of
thousands of patch features, so the ``N×M`` distance matrix of a test batch does not fit: no
implementation here ever materialises it.

* Reference (:func:`knn_reference`): tiles the queries and the bank, computes squared distances
  ``|q|² - 2 q·b + |b|²`` per tile in float32 and merges each tile's ``k`` best into a running
  ``[N, k]`` result. Memory ``O(N·k + tiles)``.
* Triton: a program owns a block of queries and streams the bank in tiles. The tile's squared
  distances come from ``tl.dot`` (fp32 accumulation; fp16/bf16 inputs go to the tensor cores),
  and a running top-k lives in registers: distance and index are packed into one int64 key
  (a non-negative float's bits order like the float), the tile is sorted, its ``k`` best are
  joined with the running ``k`` best and sorted again. Nothing but ``[N, k]`` is written.
* Baselines for the benchmark: :func:`knn_chunked_matmul_topk` (what anomalib does: a full row
  of ``M`` distances per chunk of queries, then ``topk``) and :func:`knn_cdist_topk`
  (``torch.cdist`` + ``topk``, the whole matrix at once).

Squared distances are clamped at 0 before the square root. Ties may come in any order; the
distances do not depend on it.
"""

from __future__ import annotations

import torch

from fastuad.ops._dispatch import (
    HAS_TRITON,
    TRITON_INTERPRET,
    is_exporting,
    select_backend,
    standard_backends,
)
from fastuad.ops._launch import cdiv, dot_precision, next_power_of_2
from fastuad.ops._validate import check_tensor, out_dtype

if HAS_TRITON:
    import triton
    import triton.language as tl


__all__ = [
    "knn",
    "knn_reference",
    "knn_dense_reference",
    "knn_chunked_matmul_topk",
    "knn_cdist_topk",
    "KNN_BACKENDS",
    "MAX_FUSED_K",
]

MAX_FUSED_K = 64
_KNN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # keys pack a float32 distance


# --------------------------------------------------------------------------------------------
# Reference and baselines
# --------------------------------------------------------------------------------------------


def _sq_norms(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return x.to(dt).pow(2).sum(dim=1)


def knn_reference(
    query: torch.Tensor, bank: torch.Tensor, k: int = 1, query_chunk: int = 4096, bank_chunk: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN by tiles of ``query_chunk × bank_chunk`` distances, merged into a running top-k.

    Distances in float32 (float64 inputs: float64), ascending; indices int64.
    """
    dt = out_dtype(query.dtype)
    n = query.shape[0]
    dist = torch.empty((n, k), device=query.device, dtype=dt)
    index = torch.empty((n, k), device=query.device, dtype=torch.int64)
    bank_sq = _sq_norms(bank, dt)
    for q0 in range(0, n, query_chunk):
        q = query[q0 : q0 + query_chunk].to(dt)
        q_sq = q.pow(2).sum(dim=1, keepdim=True)
        best_d = best_i = None
        for b0 in range(0, bank.shape[0], bank_chunk):
            b = bank[b0 : b0 + bank_chunk].to(dt)
            d2 = (q_sq - 2.0 * (q @ b.t()) + bank_sq[b0 : b0 + bank_chunk]).clamp_min_(0.0)
            tile_d, tile_i = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
            tile_i += b0
            if best_d is not None:
                tile_d = torch.cat([best_d, tile_d], dim=1)
                tile_i = torch.cat([best_i, tile_i], dim=1)
                tile_d, pick = tile_d.topk(k, dim=1, largest=False)
                tile_i = tile_i.gather(1, pick)
            best_d, best_i = tile_d, tile_i
        dist[q0 : q0 + query_chunk] = best_d.sqrt()
        index[q0 : q0 + query_chunk] = best_i
    return dist, index


def knn_dense_reference(query: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The export lowering of :func:`knn`: one ``|q|² - 2 q·bᵀ + |b|²`` matmul and one TopK.

    Same math as :func:`knn_reference` without the chunk loops (whose trip counts would be
    frozen into a traced graph); it materialises ``[N, M]`` distances, which ONNX Runtime and
    TensorRT handle for the bank sizes of a deployed model.
    """
    dt = out_dtype(query.dtype)
    q, b = query.to(dt), bank.to(dt)
    d2 = (q.pow(2).sum(dim=1, keepdim=True) - 2.0 * (q @ b.t()) + b.pow(2).sum(dim=1).unsqueeze(0)).clamp_min(0.0)
    dist, index = d2.topk(k, dim=1, largest=False)
    return dist.sqrt(), index


def _run_torch(query: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if is_exporting():
        return knn_dense_reference(query, bank, k)
    return knn_reference(query, bank, k)


def knn_chunked_matmul_topk(
    query: torch.Tensor, bank: torch.Tensor, k: int = 1, query_chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """anomalib's PatchCore search: per chunk of queries, the full ``[chunk, M]`` distance rows
    (``|x|² - 2 x·yᵀ + |y|²``, clamped, square root) then ``min``/``topk``. Peak ``O(chunk·M)``."""
    dists, indices = [], []
    bank_sq = bank.pow(2).sum(dim=-1, keepdim=True).transpose(0, 1)
    for q in query.split(query_chunk):
        d = (q.pow(2).sum(dim=-1, keepdim=True) - 2 * (q @ bank.t()) + bank_sq).clamp_min_(0).sqrt_()
        if k == 1:
            v, i = d.min(dim=1, keepdim=True)
        else:
            v, i = d.topk(k, dim=1, largest=False)
        dists.append(v)
        indices.append(i)
    return torch.cat(dists).float(), torch.cat(indices)


def knn_cdist_topk(query: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.cdist`` over the whole bank, then ``topk``: materialises ``N×M`` (baseline)."""
    d = torch.cdist(query.float(), bank.float())
    v, i = d.topk(k, dim=1, largest=False)
    return v, i


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _k_best(keys, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr, KP: tl.constexpr):
        """The ``KP`` smallest keys of each row of ``[BLOCK_N, WIDTH]``, ascending.

        After an ascending sort, the elementwise minimum over the ``WIDTH/KP`` groups of ``KP``
        consecutive keys is the first group.
        """
        keys = tl.sort(keys, dim=1)
        if WIDTH == KP:
            return keys
        return tl.min(tl.reshape(keys, [BLOCK_N, WIDTH // KP, KP]), axis=1)

    @triton.jit
    def _knn_kernel(
        q_ptr, b_ptr, qsq_ptr, bsq_ptr, dist_ptr, idx_ptr,
        N, M, D, K,
        sq_n, sq_d, sb_m, sb_d,
        DOT_PRECISION: tl.constexpr,
        KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        q_sq = tl.load(qsq_ptr + rows, mask=rmask, other=0.0)
        # Running best keys: (float bits of d² << 32) | bank index; +inf distance to start.
        empty = (tl.full([BLOCK_N, KP], 0x7F800000, tl.int64) << 32) | 0x7FFFFFFF
        best = empty
        for m0 in range(0, M, BLOCK_M):
            j = m0 + tl.arange(0, BLOCK_M)
            jmask = j < M
            dot = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                dmask = dd < D
                q = tl.load(q_ptr + rows[:, None] * sq_n + dd[None, :] * sq_d, mask=rmask[:, None] & dmask[None, :], other=0.0)
                b = tl.load(b_ptr + j[:, None] * sb_m + dd[None, :] * sb_d, mask=jmask[:, None] & dmask[None, :], other=0.0)
                dot = tl.dot(q, tl.trans(b), dot, input_precision=DOT_PRECISION)
            b_sq = tl.load(bsq_ptr + j, mask=jmask, other=0.0)
            d2 = tl.maximum(q_sq[:, None] - 2.0 * dot + b_sq[None, :], 0.0)
            d2 = tl.where(jmask[None, :], d2, float("inf"))
            keys = (d2.to(tl.int32, bitcast=True).to(tl.int64) << 32) | j[None, :].to(tl.int64)
            tile_best = _k_best(keys, BLOCK_N, BLOCK_M, KP)
            merged = tl.reshape(tl.join(best, tile_best), [BLOCK_N, 2 * KP])
            best = _k_best(merged, BLOCK_N, 2 * KP, KP)
        d2 = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        idx = best & 0xFFFFFFFF
        col = tl.arange(0, KP)
        omask = rmask[:, None] & (col < K)[None, :]
        out = rows[:, None] * K + col[None, :]
        tl.store(dist_ptr + out, tl.sqrt(d2), mask=omask)
        tl.store(idx_ptr + out, idx, mask=omask)


def _knn_blocks(k: int, dim: int) -> tuple[int, int, int, int, int]:
    """(KP, BLOCK_N, BLOCK_M, BLOCK_D, num_warps); tiles are powers of two, ``BLOCK_M >= KP``."""
    kp = max(2, next_power_of_2(k))
    if TRITON_INTERPRET:
        return kp, 16, max(16, kp), 16, 4
    block_d = min(64, max(16, next_power_of_2(dim)))
    return kp, 64, max(64, kp), block_d, 4 if kp <= 16 else 8


def knn_triton(query: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the streaming top-k kernel (``k <= MAX_FUSED_K``)."""
    n, dim = query.shape
    m = bank.shape[0]
    dist = torch.empty((n, k), device=query.device, dtype=torch.float32)
    index = torch.empty((n, k), device=query.device, dtype=torch.int64)
    if n == 0:
        return dist, index
    q_sq = _sq_norms(query, torch.float32)
    b_sq = _sq_norms(bank, torch.float32)
    kp, block_n, block_m, block_d, warps = _knn_blocks(k, dim)
    _knn_kernel[(cdiv(n, block_n),)](
        query, bank, q_sq, b_sq, dist, index, n, m, dim, k, *query.stride(), *bank.stride(),
        DOT_PRECISION=dot_precision(query.device, query.dtype),
        KP=kp, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return dist, index


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def _triton_check(tensors, k: int = 1, **_) -> list[str]:
    reasons = []
    if k > MAX_FUSED_K:
        reasons.append(f"triton keeps the running top-k in registers: k <= {MAX_FUSED_K}, got k={k}")
    if tensors[1].shape[0] >= 2**31:
        reasons.append(f"triton packs bank indices in 32 bits: M < 2**31, got M={tensors[1].shape[0]}")
    if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
        reasons.append("triton knn is not differentiable (run it under torch.no_grad())")
    return reasons


KNN_BACKENDS = standard_backends(
    _run_torch, knn_triton, dtypes=_KNN_DTYPES, fused_dtypes=_FUSED_DTYPES, check=_triton_check
)


def knn(query: torch.Tensor, bank: torch.Tensor, k: int = 1, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest bank rows of every query row, by Euclidean distance.

    Args:
        query: ``[N, D]`` floating point.
        bank: ``[M, D]``, same dtype and device as ``query``.
        k: ``1 <= k <= M`` (the Triton path takes ``k <= 64``; ``"auto"`` uses the reference
            above that).
        backend: ``"auto"``, ``"torch"`` (reference) or ``"triton"``.

    Returns:
        ``(dist [N, k] float32 (float64 for float64 inputs), index [N, k] int64)``, ascending
        distance. Not differentiable on the Triton path.
    """
    check_tensor("query", query, 2, "[N, D]")
    check_tensor("bank", bank, 2, "[M, D]")
    if bank.shape[1] != query.shape[1]:
        raise ValueError(f"bank must have the query's feature dim D={query.shape[1]}, got bank {tuple(bank.shape)}")
    if bank.dtype != query.dtype:
        raise TypeError(f"query and bank must have the same dtype, got {query.dtype} and {bank.dtype}")
    if bank.device != query.device:
        raise ValueError(f"query and bank must be on the same device, got {query.device} and {bank.device}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > bank.shape[0]:
        raise ValueError(f"k must be at most the bank size M={bank.shape[0]}, got k={k}")
    impl = select_backend("knn", backend, KNN_BACKENDS, (query, bank), k=k)
    return impl.fn(query, bank, k)
