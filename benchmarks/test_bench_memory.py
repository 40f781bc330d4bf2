"""Benchmarks of memory-bank addressing: ``memread`` and ``knn`` from DESIGN.md "Benchmark workloads".

* ``memread``: :func:`fastuad.ops.memory_read` forward + backward, DualAD's addressing (cosine,
  hard shrinkage ``λ = 1/M``), loss ``(out * g).sum()`` with a fixed random ``g``, gradients to
  the queries and the memory. Cases: ``M = 196`` and ``2048`` slots, and class-aware banks
  (``K = 15`` classes of 196 slots). Backends: ``eager`` (the reference), ``compile``
  (``torch.compile`` of the reference), ``triton``.
* ``knn``: :func:`fastuad.ops.knn_search`, exact k-NN in a PatchCore bank, ``k = 1`` and ``9``.
  Backends, in this order: ``eager`` (the op with ``backend="torch"``: tiled reference),
  ``chunked`` (anomalib's chunked matmul + topk, :func:`fastuad.ops.knn_search.knn_chunked_matmul_topk`),
  ``cdist`` (``torch.cdist`` + ``topk``), ``triton``, and ``faiss`` (``GpuIndexFlatL2``, only
  on CUDA with faiss installed). Records carry ``speedup_vs_chunked`` and ``speedup_vs_cdist``
  beside the harness's ``speedup_vs_eager``. Distances are checked against the reference, and
  returned indices by recomputing the distance to the bank rows they name.

Sizes: DESIGN.md's on CUDA; scaled-down CPU versions otherwise (``FASTUAD_BENCH_SIZE``,
``FASTUAD_BENCH_TINY``, ``FASTUAD_BENCH_DEVICE`` as in :mod:`test_bench_cosine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fastuad.ops import knn, knn_reference, memory_read, memory_read_reference
from fastuad.ops.knn_search import KNN_BACKENDS, knn_cdist_topk, knn_chunked_matmul_topk
from fastuad.ops.memory import MEMORY_READ_BACKENDS
from test_bench_cosine import ATOL, DEVICE, DTYPE_NAMES, SIZE, _generator, _randn

# size -> (N, D, [(M, K)]) ; K = None: one shared bank
MEMREAD_SIZES = {
    "full": (32768, 256, [(196, None), (2048, None), (196, 15)]),
    "cpu": (1024, 64, [(49, None), (256, None), (49, 15)]),
    "tiny": (128, 32, [(49, None), (49, 3)]),
}
# size -> (N, D, M, ks)
KNN_SIZES = {
    "full": (32768, 1536, 200000, (1, 9)),
    "cpu": (512, 128, 8192, (1, 9)),
    "tiny": (64, 32, 512, (1, 9)),
}
# Timed dtypes: both on CUDA; fp32 on CPU (fp16 matmuls there measure nothing useful).
DTYPES = (torch.float16, torch.float32) if SIZE == "full" else (torch.float32,)
MEMREAD_BACKENDS = ("eager", "compile", "triton")
KNN_BENCH_BACKENDS = ("eager", "chunked", "cdist", "triton", "faiss")
KNN_BASELINES = ("chunked", "cdist")
TEMPERATURE = 1.0


@dataclass(frozen=True)
class MemreadCase:
    n: int
    dim: int
    slots: int
    classes: int | None
    dtype: torch.dtype

    @property
    def id(self) -> str:
        k = f"-K{self.classes}" if self.classes else ""
        return f"N{self.n}-D{self.dim}-M{self.slots}{k}-{DTYPE_NAMES[self.dtype]}"

    @property
    def memory_shape(self) -> list[int]:
        return ([self.classes] if self.classes else []) + [self.slots, self.dim]


@dataclass(frozen=True)
class KnnCase:
    n: int
    dim: int
    bank: int
    k: int
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"N{self.n}-D{self.dim}-M{self.bank}-k{self.k}-{DTYPE_NAMES[self.dtype]}"


def _params(workload: str, cases, backends) -> list:
    return [
        pytest.param(case, backend, id=f"{case.id}-{backend}", marks=pytest.mark.benchmark(group=f"{workload}-{case.id}"))
        for case in cases
        for backend in backends
    ]


_N, _D, _BANKS = MEMREAD_SIZES[SIZE]
MEMREAD_CASES = [MemreadCase(_N, _D, m, k, dt) for m, k in _BANKS for dt in DTYPES]
_N, _D, _M, _KS = KNN_SIZES[SIZE]
KNN_CASES = [KnnCase(_N, _D, _M, k, dt) for k in _KS for dt in DTYPES]


def _describe(bench, workload: str, case, backend: str, **more) -> None:
    bench.describe(workload=workload, case=case.id, backend=backend, dtype=case.dtype, device=DEVICE, size=SIZE, **more)


# --------------------------------------------------------------------------------------------
# memread: memory_read forward + backward
# --------------------------------------------------------------------------------------------


def _memread_tolerances(expected, fwd_bwd, query, memory, cls, kwargs, atol: float) -> list[float]:
    """Relative tolerances (of the largest reference value) for out, grad_query, grad_memory.

    MemAE's shrinkage ``relu(w-λ)·w/(|w-λ|+1e-12)`` has a derivative that swings by O(1) when a
    weight moves by a rounding error next to λ, and with ``λ = 1/M`` and cosine logits many
    weights sit next to λ. So a gradient is held to ``atol`` or to three times the float32
    eager reference's own distance from a float64 evaluation, whichever is larger: no
    implementation is asked to be closer to the eager one than the eager one is to the truth.
    """
    exact = fwd_bwd(lambda q, m, c, **kw: memory_read_reference(q.double(), m.double(), c, **kw))
    tols = []
    for got, truth in zip(expected, exact):
        scale = max(float(truth.abs().max()), 1e-30)
        tols.append(max(atol, 3.0 * float((got.double() - truth).abs().max()) / scale))
    return tols



@pytest.mark.parametrize("case,backend", _params("memread", MEMREAD_CASES, MEMREAD_BACKENDS))
def test_memread(benchmark, fastuad_bench, case: MemreadCase, backend: str):
    bench = fastuad_bench
    lam = 1.0 / case.slots
    params = {"similarity": "cosine", "temperature": TEMPERATURE, "shrink_threshold": lam, "pass": "fwd+bwd"}
    _describe(bench, "memread", case, backend, shapes=[[case.n, case.dim], case.memory_shape], params=params)

    gen = _generator(f"memread-{case.id}")
    query = _randn([case.n, case.dim], gen).to(case.dtype).requires_grad_(True)
    memory = _randn(case.memory_shape, gen).to(case.dtype).requires_grad_(True)
    cls = None
    if case.classes:
        cls = torch.randint(0, case.classes, (case.n,), generator=gen, device=DEVICE)
    g = _randn([case.n, case.dim], gen)
    kwargs = dict(similarity="cosine", temperature=TEMPERATURE, shrink_threshold=lam)
    # The least a fused fwd+bwd moves: queries read twice and their gradient written, g read.
    bytes_min = 3 * query.numel() * query.element_size() + g.numel() * 4

    def fwd_bwd(fn):
        out = fn(query, memory, cls, **kwargs)
        gq, gm = torch.autograd.grad((out * g).sum(), (query, memory))
        return out.detach(), gq, gm

    expected = fwd_bwd(memory_read_reference)
    tolerances = _memread_tolerances(expected, fwd_bwd, query, memory, cls, kwargs, ATOL[case.dtype])

    if backend == "compile":
        op = bench.compile(memory_read_reference)
    else:
        name = "torch" if backend == "eager" else backend
        bench.require("memory_read", MEMORY_READ_BACKENDS, name, (query, memory))

        def op(q, m, c, **kw):
            return memory_read(q, m, c, backend=name, **kw)

    def run():
        return fwd_bwd(op)

    out, gq, gm = bench.first_call(run, compiled=backend == "compile")
    bench.assert_close("out", out, expected[0], tolerances[0], scale=True)
    bench.assert_close("grad_query", gq, expected[1], tolerances[1], scale=True)
    bench.assert_close("grad_memory", gm, expected[2], tolerances[2], scale=True)
    del out, gq, gm, expected

    bench.measure(run, device=DEVICE, bytes_read=bytes_min, bytes_label="bytes_min")


# --------------------------------------------------------------------------------------------
# knn: exact nearest neighbours in a PatchCore bank
# --------------------------------------------------------------------------------------------


def _faiss_knn(query: torch.Tensor, bank: torch.Tensor, k: int):
    """faiss ``GpuIndexFlatL2`` (exact) over the bank; squared distances -> distances."""
    import faiss  # noqa: PLC0415

    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatL2(res, bank.shape[1])
    index.add(bank.float().cpu().numpy())

    def run(q):
        d2, i = index.search(q.float().cpu().numpy(), k)
        return torch.from_numpy(d2).clamp_min(0).sqrt().to(q.device), torch.from_numpy(i).to(q.device)

    return run


def _distance_at(query: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``|q_n - bank[index[n, j]]|`` in float64, by chunks of queries (checks returned indices)."""
    out = []
    for q, i in zip(query.split(chunk), index.split(chunk)):
        out.append(torch.linalg.vector_norm(q[:, None, :].double() - bank[i].double(), dim=-1))
    return torch.cat(out)


# Relative slack of a named neighbour's exact distance over the reference's k-th distance: the
# float32 reference's own rounding (|q|² - 2q·b + |b|² cancels ~1e-7·|q|² in d²), far below the
# gap to the next-nearest row, so a wrong neighbour fails where a tolerance scaled by the
# largest distance (2e-3 · max d for fp16) let it through.
KNN_NEIGHBOUR_RTOL = 1e-4
KNN_BASELINE_RTOL_FP16 = 1e-2


class _Errors:
    def __init__(self) -> None:
        self.errors: dict[str, float] = {}


def test_check_neighbours_catches_a_wrong_neighbour():
    """The fp16 knn check fails when one query's neighbour is the second-nearest row, which a
    tolerance of 2e-3 times the largest distance accepted."""
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(64, 256, generator=gen).half()
    bank = torch.randn(4096, 256, generator=gen).half()
    expected, index = knn_reference(query, bank, 1)
    d2, i2 = knn_reference(query, bank, 2)
    check_neighbours(_Errors(), query, bank, expected, index, expected)
    wrong_i, wrong_d = index.clone(), expected.clone()
    gap = (d2[:, 1] - d2[:, 0]) / d2[:, 0]
    # a query whose second-nearest row is clearly farther (> 5e-4 relative) but not by much
    n = int(torch.where(gap > 5e-4, gap, float("inf")).argmin())
    wrong_i[n, 0], wrong_d[n, 0] = i2[n, 1], d2[n, 1]
    assert float((wrong_d - expected).abs().max()) <= 2e-3 * float(expected.abs().max())  # the old check passed it
    with pytest.raises(AssertionError, match="farther than the k-th nearest"):
        check_neighbours(_Errors(), query, bank, wrong_d, wrong_i, expected)


def check_neighbours(bench, query, bank, dist, index, expected, rtol: float = KNN_NEIGHBOUR_RTOL) -> float:
    """Every returned index names a true k-nearest row: its exact (float64) distance is at most
    the reference's k-th distance (times ``1 + rtol``), the indices of a row are distinct, and
    the returned distances are those of the rows they name. Returns the worst relative excess."""
    named = _distance_at(query, bank, index)
    kth = expected[:, -1:].double()
    excess = float(((named - kth) / kth.clamp_min(1e-30)).max())
    bench.errors["dist_at_index_rel_excess"] = excess
    assert excess <= rtol, f"dist_at_index: a returned index is {excess:.3e} (relative) farther than the k-th nearest row"
    assert bool((index.sort(dim=1).values.diff(dim=1) != 0).all()), "knn returned a bank row twice for one query"
    err = float(((dist.double() - named).abs() / named.clamp_min(1e-30)).max())
    assert err <= rtol, f"dist: returned distances differ from the named rows' by {err:.3e} (relative)"
    return excess


def _add_baseline_speedups(bench, backend: str) -> None:
    """``speedup_vs_chunked`` / ``speedup_vs_cdist`` on the record ``measure`` just made."""
    store = bench.store
    if not store.records or store.records[-1].get("test") != bench.request.node.nodeid:
        return
    record = store.records[-1]
    medians = store.medians.get((record["workload"], record["case"]), {})
    for base in KNN_BASELINES:
        if base in medians and base != backend:
            record[f"speedup_vs_{base}"] = medians[base] / medians[backend]
            bench.benchmark.extra_info[f"speedup_vs_{base}"] = record[f"speedup_vs_{base}"]


@pytest.mark.parametrize("case,backend", _params("knn", KNN_CASES, KNN_BENCH_BACKENDS))
def test_knn(benchmark, fastuad_bench, case: KnnCase, backend: str):
    bench = fastuad_bench
    _describe(bench, "knn", case, backend, shapes=[[case.n, case.dim], [case.bank, case.dim]], params={"k": case.k})

    gen = _generator(f"knn-{case.id}")
    query = _randn([case.n, case.dim], gen).to(case.dtype)
    bank = _randn([case.bank, case.dim], gen).to(case.dtype)
    bytes_min = (query.numel() + bank.numel()) * query.element_size()

    with torch.no_grad():
        expected, _ = knn_reference(query, bank, case.k)

    if backend == "chunked":
        op = knn_chunked_matmul_topk
    elif backend == "cdist":
        op = knn_cdist_topk
    elif backend == "faiss":
        try:
            import faiss  # noqa: F401,PLC0415
        except ImportError:
            bench.skip("faiss is not installed")
        if DEVICE.type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
            bench.skip("the faiss baseline needs a CUDA device and faiss-gpu")
        op_gpu = _faiss_knn(query, bank, case.k)

        def op(q, b, k):
            return op_gpu(q)

    else:
        name = "torch" if backend == "eager" else backend
        bench.require("knn", KNN_BACKENDS, name, (query, bank), k=case.k)

        def op(q, b, k):
            return knn(q, b, k, backend=name)

    def run():
        with torch.no_grad():
            return op(query, bank, case.k)

    dist, index = bench.first_call(run)
    assert index.dtype == torch.int64 and dist.dtype == torch.float32
    # fastuad's backends hold fp16 to the reference's accuracy (products accumulate in fp32); the
    # baselines are timed as users run them (anomalib's chunked search multiplies in fp16).
    rtol = KNN_NEIGHBOUR_RTOL if backend in ("eager", "triton") or case.dtype == torch.float32 else KNN_BASELINE_RTOL_FP16
    bench.assert_close("dist", dist, expected, rtol, scale=True)
    check_neighbours(bench, query, bank, dist, index, expected, rtol)
    del dist, index

    bench.measure(run, device=DEVICE, bytes_read=bytes_min, bytes_label="bytes_min")
    _add_baseline_speedups(bench, backend)
