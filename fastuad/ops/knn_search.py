"""Exact k-nearest-neighbour search in a memory bank (PatchCore-style anomaly scoring).

``knn(query, bank, k)`` returns, for each query row, the ``k`` smallest Euclidean distances to
the bank's rows (ascending) and their int64 indices. A PatchCore bank holds hundreds of
thousands of patch features, so the ``N×M`` distance matrix of a test batch does not fit: no
implementation here ever materialises it.

* Reference (:func:`knn_reference`): tiles the queries and the bank, computes squared distances
  ``|q|² - 2 q·b + |b|²`` per tile in float32 and merges each tile's ``k`` best into a running
  ``[N, k]`` result. Memory ``O(N·k + tiles)``.
* Triton: a program owns a block of queries and streams the bank in tiles. The tile's squared
  distances come from ``tl.dot`` (fp32 accumulation; fp16/bf16 inputs go to the tensor cores)
  and become int32 order keys (a non-negative float's bits order like the float). A running
  best-``k`` set per query lives unsorted in registers; while some query's smallest remaining
  tile key beats its current worst, that key replaces the worst (min/max reductions, at most
  ``k`` rounds a tile, usually none once the set is good). The set is written in ascending
  order at the end. Nothing but ``[N, k]`` is written; bank norms can be passed precomputed.
* Baselines for the benchmark: :func:`knn_chunked_matmul_topk` (what anomalib does: a full row
  of ``M`` distances per chunk of queries, then ``topk``) and :func:`knn_cdist_topk`
  (``torch.cdist`` + ``topk``, the whole matrix at once).

Squared distances are clamped at 0 before the square root. Ties may come in any order; the
distances do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fastuad.ops._dispatch import (
    HAS_TRITON,
    is_exporting,
    select_backend,
    standard_backends,
)
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
from fastuad.ops._validate import check_tensor, out_dtype

if HAS_TRITON:
    import triton
    import triton.language as tl


__all__ = [
    "knn",
    "knn_reference",
    "knn_dense_reference",
    "bank_sq_norms",
    "knn_config",
    "compile_targets",
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


def bank_sq_norms(bank: torch.Tensor, chunk_elems: int = 2**24) -> torch.Tensor:
    """Squared row norms ``[M]`` of a bank ``[M, D]``, summed in float32 (float64 stays).

    Computed by chunks of rows, so a 16-bit bank is never copied to float32 whole. Pass the
    result to :func:`knn` as ``bank_sq_norms=`` to search one bank many times without
    recomputing it (:class:`fastuad.nn.MemoryBank` keeps it as a buffer).
    """
    dt = out_dtype(bank.dtype)
    rows = max(1, chunk_elems // max(1, bank.shape[1]))
    out = torch.empty(bank.shape[0], device=bank.device, dtype=dt)
    for r0 in range(0, bank.shape[0], rows):
        part = bank[r0 : r0 + rows].to(dt)
        out[r0 : r0 + rows] = (part * part).sum(dim=1)
    return out


def knn_reference(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    query_chunk: int = 4096,
    bank_chunk: int = 16384,
    bank_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN by tiles of ``query_chunk × bank_chunk`` distances, merged into a running top-k.

    Distances in float32 (float64 inputs: float64), ascending; indices int64. A NaN distance
    ranks after every number (``torch.topk``'s order) and is returned as NaN. ``bank_sq``:
    precomputed :func:`bank_sq_norms`.
    """
    dt = out_dtype(query.dtype)
    n = query.shape[0]
    dist = torch.empty((n, k), device=query.device, dtype=dt)
    index = torch.empty((n, k), device=query.device, dtype=torch.int64)
    bank_sq = bank_sq_norms(bank) if bank_sq is None else bank_sq.to(dt)
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


def _run_torch(
    query: torch.Tensor, bank: torch.Tensor, k: int, bank_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend: the tiled reference, or its one-matmul lowering while exporting."""
    if is_exporting():
        return knn_dense_reference(query, bank, k)
    return knn_reference(query, bank, k, bank_sq=bank_sq)


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
    def _d2_keys(q_sq, dot, b_sq, jmask):
        """Order keys of squared distances ``|q|² - 2q·b + |b|²``: the int32 bits of the float.

        A non-negative float's bits order like the float. Negative rounding error is clamped to
        +0, NaN becomes the canonical quiet NaN (ranks after every number, as in ``torch.topk``)
        and padded slots get ``0x7FFFFFFF``, after everything.
        """
        d2 = q_sq[:, None] - 2.0 * dot + b_sq[None, :]
        keys = tl.where(d2 > 0, d2, 0.0).to(tl.int32, bitcast=True)
        keys = tl.where(d2 != d2, 0x7FC00000, keys)
        return tl.where(jmask[None, :], keys, 0x7FFFFFFF)

    @triton.jit
    def _knn_kernel(
        q_ptr, b_ptr, qsq_ptr, bsq_ptr, dist_ptr, idx_ptr,
        N, M, D, K,
        sq_n, sb_m,
        DOT_PRECISION: tl.constexpr,
        KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """``K`` nearest bank rows of ``BLOCK_N`` queries, streaming the bank in ``BLOCK_M`` tiles.

        The running best is an unsorted ``[BLOCK_N, KP]`` set of (key, index). Per tile, while
        some query's smallest remaining tile key beats its current worst, that key replaces the
        worst and leaves the tile: at most ``KP`` rounds, usually none once the set is good.
        Selection by ``min``/``max`` reductions keeps only ``int32`` tiles in registers (a full
        sort of a 64-wide int64 tile spilled). Pointers advance in 64 bits per tile, so banks
        with ``M·D >= 2**31`` elements are addressed correctly.
        """
        pid = tl.program_id(0)
        row0 = pid * BLOCK_N
        r = tl.arange(0, BLOCK_N)
        rmask = row0 + r < N
        q_rows = q_ptr + row0.to(tl.int64) * sq_n
        q_sq = tl.load(qsq_ptr + row0 + r, mask=rmask, other=0.0)
        cols = tl.arange(0, BLOCK_M)
        kcol = tl.arange(0, KP)
        best = tl.full([BLOCK_N, KP], 0x7FFFFFFF, tl.int32)
        best_i = tl.zeros([BLOCK_N, KP], tl.int32)
        b_rows = b_ptr  # advanced by BLOCK_M rows per tile: 64-bit pointer arithmetic
        for m0 in range(0, M, BLOCK_M):
            jmask = m0 + cols < M
            dot = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                dmask = dd < D
                q = tl.load(q_rows + r[:, None] * sq_n + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
                b = tl.load(b_rows + cols[:, None] * sb_m + dd[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0)
                dot = tl.dot(q, tl.trans(b), dot, input_precision=DOT_PRECISION)
            b_sq = tl.load(bsq_ptr + m0 + cols, mask=jmask, other=0.0)
            keys = _d2_keys(q_sq, dot, b_sq, jmask)
            t, t_pos = tl.min(keys, axis=1, return_indices=True)
            worst, w_pos = tl.max(best, axis=1, return_indices=True)
            while tl.max((t < worst).to(tl.int32), axis=0) > 0:
                take = (t < worst)[:, None] & (kcol[None, :] == w_pos[:, None])
                best = tl.where(take, t[:, None], best)
                best_i = tl.where(take, (m0 + t_pos)[:, None], best_i)
                keys = tl.where(cols[None, :] == t_pos[:, None], 0x7FFFFFFF, keys)
                t, t_pos = tl.min(keys, axis=1, return_indices=True)
                worst, w_pos = tl.max(best, axis=1, return_indices=True)
            b_rows += BLOCK_M * sb_m
        # Write the set in ascending order: K rounds of extracting the smallest.
        out = (row0 + r).to(tl.int64) * K
        for i in range(0, K):
            v, pos = tl.min(best, axis=1, return_indices=True)
            sel = kcol[None, :] == pos[:, None]
            idx = tl.sum(tl.where(sel, best_i, 0), axis=1)
            best = tl.where(sel, 0x7FFFFFFF, best)
            omask = rmask
            tl.store(dist_ptr + out + i, tl.sqrt(v.to(tl.float32, bitcast=True)), mask=omask)
            tl.store(idx_ptr + out + i, idx.to(tl.int64), mask=omask)


@dataclass(frozen=True)
class KnnConfig:
    """Launch configuration of :func:`_knn_kernel`: running top-k width ``kp``, tiles, warps, stages."""

    kp: int
    block_n: int
    block_m: int
    block_d: int
    num_warps: int
    num_stages: int


def knn_config(k: int, dim: int, dtype: torch.dtype, gpu: bool | None = None, arch: int | None = None) -> KnnConfig:
    """The launch configuration for ``k`` neighbours of ``dim``-wide ``dtype`` rows on ``arch``.

    ``gpu=None`` follows the process (the interpreter's small tiles under ``TRITON_INTERPRET``
    unless :func:`fastuad.ops._launch.gpu_tiles` is active); ``True`` is what a GPU launch uses.
    ``arch`` is the GPU's compute capability as ``major * 10 + minor``
    (:func:`fastuad.ops._launch.launch_arch`); None means sm_90. Tiles are powers of two and
    ``BLOCK_M >= KP``.

    sm_90 (and None): 64×64 tiles, 4 warps (8 from ``KP > 16``), ``BLOCK_D`` 64 for 16-bit inputs
    and 32 for float32, whose 3xTF32 products hold each operand as two halves (a 64-wide D step
    spilled there). sm_8x (A100 and consumer Ampere/Ada): with those launches ptxas spilled
    8-16 B on sm_80 (Triton 3.8), so 16-bit inputs take 8 warps (96-128 registers) and float32 a
    16-wide D step (4 warps, 8 from ``KP > 16``; 168-254 registers): 0 stack bytes for every
    ``k`` up to 64.
    These sm_8x tiles were chosen for zero spills by the compile check
    (``python -m fastuad.ops.compile_check --arch 80 --module knn_search``), not tuned for speed
    on an A100 (none was available).
    """
    kp = next_power_of_2(k)
    if gpu is None:
        gpu = not interpreter_tiles()
    if not gpu:
        return KnnConfig(kp, 16, max(16, kp), 16, 4, 2)
    width = max(16, next_power_of_2(dim))
    if sm8x_tiles(arch):
        if dtype == torch.float32:
            return KnnConfig(kp, 64, max(64, kp), 16, 4 if kp <= 16 else 8, 2)
        return KnnConfig(kp, 64, max(64, kp), min(64, width), 8, 2)
    # fp32 runs 3xTF32 products (each operand split in two): a 64-wide D step spills there.
    block_d = min(32 if dtype == torch.float32 else 64, width)
    return KnnConfig(kp, 64, max(64, kp), block_d, 4 if kp <= 16 else 8, 2)


_INT32_SPAN = 2**31


def _unit_inner_stride(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with unit stride along D, and a row stride whose in-tile offsets (``rows`` rows)
    fit in int32; copied only when it has neither (a column-major or oddly strided view)."""
    if x.stride(1) == 1 and x.stride(0) * rows < _INT32_SPAN:
        return x
    return x.contiguous()


def knn_triton(
    query: torch.Tensor, bank: torch.Tensor, k: int, bank_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the streaming top-k kernel (``k <= MAX_FUSED_K``); ``bank_sq`` as from :func:`bank_sq_norms`."""
    n, dim = query.shape
    m = bank.shape[0]
    dist = torch.empty((n, k), device=query.device, dtype=torch.float32)
    index = torch.empty((n, k), device=query.device, dtype=torch.int64)
    if n == 0:
        return dist, index
    cfg = knn_config(k, dim, query.dtype, arch=launch_arch(query.device))
    query = _unit_inner_stride(query, cfg.block_n)
    bank = _unit_inner_stride(bank, cfg.block_m)
    q_sq = bank_sq_norms(query)
    b_sq = bank_sq_norms(bank) if bank_sq is None else bank_sq.float().contiguous()
    _knn_kernel[(cdiv(n, cfg.block_n),)](
        query, bank, q_sq, b_sq, dist, index, n, m, dim, k, query.stride(0), bank.stride(0),
        DOT_PRECISION=dot_precision(query.device, query.dtype),
        KP=cfg.kp, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dist, index


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile targets
# --------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# (workload, D, ks, dtypes, hot): DESIGN.md's knn benchmark, then PatchCore's banks (features of
# two backbone levels, D from ~160 to 1536, k = 1..9).
_KNN_WORKLOADS = (
    ("bench knn N=32768 D=1536 M=200000", 1536, (1, 9), (torch.float16, torch.float32), True),
    ("patchcore bank D=160..1536", 160, tuple(range(1, 10)), (torch.float16, torch.bfloat16, torch.float32), False),
    ("patchcore bank D=160..1536", 1536, tuple(range(1, 10)), (torch.float16, torch.bfloat16, torch.float32), False),
    ("largest fused k", 1536, (MAX_FUSED_K,), (torch.float16, torch.float32), False),
)


def _aligned(types: dict[str, str], dim: int) -> tuple[str, ...]:
    """Arguments a launch on fresh contiguous tensors sees as multiples of 16: every pointer,
    and the row strides and ``D`` when ``D`` is (all the workloads' ``D`` are)."""
    names = [n for n, t in types.items() if t.startswith("*")]
    return tuple(names + (["D", "sq_n", "sb_m"] if dim % 16 == 0 else []))


def compile_targets(arch: int | None = None) -> list[CompileTarget]:
    """Every launch configuration of :func:`_knn_kernel` on a GPU of ``arch`` (``major * 10 +
    minor``; None: sm_90) for the benchmark and model shapes."""
    targets: dict[tuple, CompileTarget] = {}
    for workload, dim, ks, dtypes, hot in _KNN_WORKLOADS:
        for dtype in dtypes:
            for k in ks:
                cfg = knn_config(k, dim, dtype, gpu=True, arch=arch)
                consts = dict(
                    DOT_PRECISION=gpu_dot_precision(dtype, arch),
                    KP=cfg.kp, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
                )
                key = (dtype, tuple(consts.items()), cfg.num_warps, cfg.num_stages)
                if key in targets:
                    if hot and not targets[key].hot:
                        targets[key] = replace(targets[key], hot=True, workload=workload)
                    continue
                el = "*" + _TRITON_TYPES[dtype]
                types = dict(q_ptr=el, b_ptr=el, qsq_ptr="*fp32", bsq_ptr="*fp32", dist_ptr="*fp32", idx_ptr="*i64")
                types.update({n: "i32" for n in ("N", "M", "D", "K", "sq_n", "sb_m")})
                targets[key] = CompileTarget(
                    kernel=_knn_kernel,
                    signature=signature(_knn_kernel, types, consts),
                    constexprs=consts,
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                    config=f"{_DTYPE_NAMES[dtype]} KP={cfg.kp} {cfg.block_n}x{cfg.block_m}x{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}",
                    workload=workload,
                    hot=hot,
                    divisible_by_16=_aligned(types, dim),
                )
    return list(targets.values())


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


def knn(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    backend: str = "auto",
    bank_sq_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest bank rows of every query row, by Euclidean distance.

    Args:
        query: ``[N, D]`` floating point.
        bank: ``[M, D]``, same dtype and device as ``query``.
        k: ``1 <= k <= M`` (the Triton path takes ``k <= 64``; ``"auto"`` uses the reference
            above that).
        backend: ``"auto"``, ``"torch"`` (reference) or ``"triton"``.
        bank_sq_norms: optional ``[M]`` squared row norms of ``bank`` from
            :func:`bank_sq_norms` (float32; float64 for a float64 bank), so that searching one
            bank repeatedly does not recompute them. They are trusted, not checked.

    Returns:
        ``(dist [N, k] float32 (float64 for float64 inputs), index [N, k] int64)``, ascending
        distance. Not differentiable on the Triton path.

    NaN: every backend ranks a NaN distance (a NaN or inf in a query or bank row) after every
    number, as ``torch.topk`` does, and returns it as NaN; which of several NaN neighbours is
    named is unspecified, like any tie. Banks of ``M·D >= 2**31`` elements are supported.
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
    if bank_sq_norms is not None:
        norms = bank_sq_norms
        if not isinstance(norms, torch.Tensor) or norms.shape != (bank.shape[0],):
            shape = tuple(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__
            raise ValueError(f"bank_sq_norms must be a tensor [M] = [{bank.shape[0]}], got {shape}")
        if norms.dtype != out_dtype(bank.dtype) or norms.device != bank.device:
            raise TypeError(
                f"bank_sq_norms must be {out_dtype(bank.dtype)} on {bank.device} (see knn_search.bank_sq_norms), "
                f"got {norms.dtype} on {norms.device}"
            )
    impl = select_backend("knn", backend, KNN_BACKENDS, (query, bank), k=k)
    return impl.fn(query, bank, k, bank_sq=bank_sq_norms)
