"""Benchmark of :func:`fastuad.ops.local_attn`: DESIGN.md's ``localattn`` workload, fwd+bwd.

Loss ``(out * g).sum()`` with a fixed random ``g``, gradients to q, k and v. Cases: ``inside``
and ``outside`` with k/v of the queries' batch, and ``inside-ref`` with k/v of batch 1 (RLR's
learnable reference, whose gradients reduce over the batch).

Backends, baselines first within every case: ``eager`` (the op with ``backend="torch"``: the
dense masked reference), ``sdpa`` (``F.scaled_dot_product_attention`` with the boolean window
mask, the issue's baseline), ``compile`` (``torch.compile`` of the reference), ``flex``
(``torch.nn.attention.flex_attention`` under ``torch.compile`` with a block mask built once,
where this torch has it) and ``triton``. Every result is checked against the eager reference
before timing; records carry ``speedup_vs_sdpa`` and ``speedup_vs_flex`` beside the harness's
own columns, and the peak memory on CUDA.

Sizes: DESIGN.md's shapes on CUDA (B=32, 32×32, 8 heads, d=32, window 7; fp16 and fp32); on CPU
B=2, 16×16, 2 heads, d=16, window 5, fp32; ``tiny`` (the interpreter): B=2, 8×8, window 3.
``FASTUAD_BENCH_SIZE`` / ``FASTUAD_BENCH_TINY`` / ``FASTUAD_BENCH_DEVICE`` as in
``test_bench_cosine.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fastuad.ops import local_attention, local_attention_reference, window_mask
from fastuad.ops.local_attn import LOCAL_ATTENTION_BACKENDS
from test_bench_cosine import ATOL, DEVICE, DTYPE_NAMES, SIZE, _describe, _generator, _randn

BACKENDS = ("eager", "sdpa", "compile", "flex", "triton")
EXTRA_BASELINES = ("sdpa", "flex")

# size -> (batch, grid, heads, head_dim, window)
LOCALATTN_SIZES = {
    "full": (32, (32, 32), 8, 32, 7),
    "cpu": (2, (16, 16), 2, 16, 5),
    "tiny": (2, (8, 8), 2, 16, 3),
}
DTYPES = (torch.float16, torch.float32) if DEVICE.type == "cuda" else (torch.float32,)


@dataclass(frozen=True)
class LocalAttnCase:
    batch: int
    grid: tuple[int, int]
    heads: int
    head_dim: int
    window: int
    mode: str
    kv_batch: int
    dtype: torch.dtype

    @property
    def id(self) -> str:
        ref = "-ref" if self.kv_batch == 1 else ""
        h, w = self.grid
        return f"{self.mode}{ref}-B{self.batch}-{h}x{w}-h{self.heads}d{self.head_dim}-w{self.window}-{DTYPE_NAMES[self.dtype]}"

    def shape(self, batch: int) -> list[int]:
        return [batch, *self.grid, self.heads, self.head_dim]


_B, _GRID, _HEADS, _D, _WIN = LOCALATTN_SIZES[SIZE]
CASES = [
    LocalAttnCase(_B, _GRID, _HEADS, _D, _WIN, mode, kv_batch, dt)
    for mode, kv_batch in (("inside", _B), ("outside", _B), ("inside", 1))
    for dt in DTYPES
]


def _heads_first(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B or 1, H, W, heads, d]`` -> ``[batch, heads, L, d]`` (the layout SDPA and flex take)."""
    b, h, w, nh, d = t.shape
    return t.expand(batch, -1, -1, -1, -1).reshape(batch, h * w, nh, d).transpose(1, 2)


def _grid_layout(o: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return o.transpose(1, 2).reshape(like.shape).float()


def _sdpa(case: LocalAttnCase):
    mask = window_mask(case.grid, case.window, case.mode, DEVICE)

    def op(q, k, v):
        b = q.shape[0]
        o = F.scaled_dot_product_attention(_heads_first(q, b), _heads_first(k, b), _heads_first(v, b), attn_mask=mask)
        return _grid_layout(o, q)

    return op


def _flex(bench, case: LocalAttnCase):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415
    except ImportError as exc:
        bench.skip(f"flex_attention is not available in torch {torch.__version__}: {exc}")
    (_, w), (r_h, r_w) = case.grid, (case.window // 2, case.window // 2)
    inside_mode = case.mode == "inside"

    def mask_mod(b, h, q_idx, kv_idx):
        inside = ((q_idx // w - kv_idx // w).abs() <= r_h) & ((q_idx % w - kv_idx % w).abs() <= r_w)
        return inside if inside_mode else ~inside

    length = case.grid[0] * w
    try:
        block_mask = create_block_mask(mask_mod, None, None, length, length, device=str(DEVICE))
    except Exception as exc:  # noqa: BLE001 - no block mask on this device/torch: a skip
        bench.skip(f"create_block_mask failed: {type(exc).__name__}: {exc}")
    compiled = bench.compile(flex_attention)

    def op(q, k, v):
        b = q.shape[0]
        o = compiled(_heads_first(q, b), _heads_first(k, b), _heads_first(v, b), block_mask=block_mask)
        return _grid_layout(o, q)

    return op


def _add_speedups(bench) -> None:
    """``speedup_vs_sdpa`` / ``speedup_vs_flex`` on the record just measured (the harness has eager/compile)."""
    if not bench.store.records or bench.store.records[-1].get("test") != bench.request.node.nodeid:
        return  # --benchmark-disable: nothing was timed
    record = bench.store.records[-1]
    medians = bench.store.medians.get((record["workload"], record["case"]), {})
    for name in EXTRA_BASELINES:
        value = medians[name] / record["median_s"] if name in medians else None
        record[f"speedup_vs_{name}"] = value
        if value is not None:
            bench.benchmark.extra_info[f"speedup_vs_{name}"] = value


@pytest.mark.parametrize(
    "case,backend",
    [
        pytest.param(case, backend, id=f"{case.id}-{backend}", marks=pytest.mark.benchmark(group=f"localattn-{case.id}"))
        for case in CASES
        for backend in BACKENDS
    ],
)
def test_localattn(benchmark, fastuad_bench, case: LocalAttnCase, backend: str):
    bench = fastuad_bench
    params = {"window": case.window, "mode": case.mode, "kv_batch": case.kv_batch, "pass": "fwd+bwd"}
    shapes = [case.shape(case.batch), case.shape(case.kv_batch), case.shape(case.kv_batch)]
    _describe(bench, "localattn", case, backend, shapes=shapes, params=params)

    gen = _generator(f"localattn-{case.id}")
    q, k, v = (_randn(s, gen).to(case.dtype).requires_grad_(True) for s in shapes)
    g = _randn(shapes[0], gen)
    # What a fused fwd+bwd must move at least: q, k, v read twice, the output written, the
    # upstream gradient read, and the three gradients written.
    bytes_min = sum(2 * t.numel() * t.element_size() for t in (q, k, v)) * 2 + 2 * g.numel() * g.element_size()

    def fwd_bwd(fn):
        out = fn(q, k, v)
        dq, dk, dv = torch.autograd.grad((out * g).sum(), (q, k, v))
        return out.detach(), dq, dk, dv

    def reference(x, y, z):
        return local_attention_reference(x, y, z, case.window, case.mode)

    expected = fwd_bwd(reference)

    if backend == "sdpa":
        op = _sdpa(case)
    elif backend == "compile":
        op = bench.compile(reference)
    elif backend == "flex":
        op = _flex(bench, case)
    else:
        name = {"eager": "torch", "triton": "triton"}[backend]
        bench.require("local_attention", LOCAL_ATTENTION_BACKENDS, name, (q, k, v))

        def op(x, y, z):
            return local_attention(x, y, z, case.window, case.mode, backend=name)

    def run():
        return fwd_bwd(op)

    got = bench.first_call(run, compiled=backend in ("compile", "flex"))
    tol = ATOL[case.dtype]
    bench.assert_close("out", got[0], expected[0], tol)
    for grad_name, actual, want in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
        bench.assert_close(grad_name, actual, want, tol, scale=True)
    del got, expected

    bench.measure(run, device=DEVICE, bytes_read=bytes_min, bytes_label="bytes_min")
    _add_speedups(bench)
