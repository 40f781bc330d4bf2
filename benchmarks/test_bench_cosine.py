"""Benchmarks of the cosine ops: ``cosmap`` and ``cosdist`` from DESIGN.md "Benchmark workloads".

* ``cosmap``: :func:`fastuad.ops.cosmap` forward (inference), RD4AD's anomaly map:
  three scales, bilinear to the output size, ``reduction="sum"``, Gaussian ``sigma=4``.
  Its physical limit is reading every feature once, so each record carries ``bytes_read``
  and ``achieved_GBps``.
* ``cosdist``: :func:`fastuad.ops.cosdist` forward + backward, the reverse-distillation
  training loss ``((1 - cos) * g).sum()`` with a fixed random ``g``, gradients to both inputs.

Backends, in this order within every case (the speedup columns need the baselines first):
``eager`` (the public op with ``backend="torch"``, i.e. the pure-PyTorch reference),
``compile`` (``torch.compile`` of the reference function, default mode, ``dynamic=False``),
``triton`` and ``cuda`` (the fused backends through the public op). A backend that cannot run
here is skipped with its ``not_supported_reasons``.

Sizes: DESIGN.md's shapes on CUDA; on CPU the same workloads scaled down (batch 2, channels / 8,
spatial / 4, output 64), keeping the ratios between scales. ``FASTUAD_BENCH_SIZE=full|cpu|tiny``
overrides the choice and ``FASTUAD_BENCH_TINY=1`` means ``tiny`` (batch 1, channels / 16,
spatial / 8, output 32: for the Triton interpreter). ``FASTUAD_BENCH_DEVICE`` picks the device.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

from fastuad.ops import cosine_distance, cosine_distance_map, cosine_distance_map_reference, cosine_distance_reference
from fastuad.ops.cosdist import COSINE_DISTANCE_BACKENDS
from fastuad.ops.cosmap import COSINE_DISTANCE_MAP_BACKENDS, gaussian_radius

BACKENDS = ("eager", "compile", "triton", "cuda")
# Harness backend -> the op's backend= name (compile wraps the reference instead).
OP_BACKEND = {"eager": "torch", "triton": "triton", "cuda": "cuda"}

# Tolerances against the eager reference (max absolute error). The reference upcasts fp16
# features to float32, as the fused kernels do, so these leave room for summation order only.
# Gradients are compared with the same numbers relative to the largest reference gradient:
# their size is about 1/|feature|, so a bare absolute bound would test nothing.
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3}

DTYPES = (torch.float16, torch.float32)
DTYPE_NAMES = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}

REDUCTION = "sum"  # RD4AD sums the per-scale maps
BLUR_SIGMA = 4.0
FEATURE_NOISE = 0.5  # student = teacher + 0.5 * noise: cos ~ 0.9, like a trained distillation pair


# --------------------------------------------------------------------------------------------
# Device and sizes
# --------------------------------------------------------------------------------------------


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def bench_device() -> torch.device:
    name = os.environ.get("FASTUAD_BENCH_DEVICE", "").strip()
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_size(device: torch.device) -> str:
    if _truthy("FASTUAD_BENCH_TINY"):
        return "tiny"
    size = os.environ.get("FASTUAD_BENCH_SIZE", "").strip().lower()
    if size:
        if size not in ("full", "cpu", "tiny"):
            raise ValueError(f"FASTUAD_BENCH_SIZE must be full, cpu or tiny, got {size!r}")
        return size
    return "full" if device.type == "cuda" else "cpu"


DEVICE = bench_device()
SIZE = bench_size(DEVICE)

# size -> (batch, scales (C, H, W), output side)
COSMAP_SIZES = {
    "full": (32, ((256, 64, 64), (512, 32, 32), (1024, 16, 16)), 256),
    "cpu": (2, ((32, 16, 16), (64, 8, 8), (128, 4, 4)), 64),
    "tiny": (1, ((16, 8, 8), (32, 4, 4), (64, 2, 2)), 32),
}
# size -> (batch, feature maps (C, H, W)); each one is its own case
COSDIST_SIZES = {
    "full": (32, ((1024, 16, 16), (256, 64, 64))),
    "cpu": (2, ((128, 4, 4), (32, 16, 16))),
    "tiny": (1, ((64, 2, 2), (16, 8, 8))),
}


@dataclass(frozen=True)
class CosmapCase:
    batch: int
    scales: tuple[tuple[int, int, int], ...]
    out_size: int
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"B{self.batch}-{DTYPE_NAMES[self.dtype]}"

    @property
    def shapes(self) -> list[list[int]]:
        return [[self.batch, *s] for s in self.scales]


@dataclass(frozen=True)
class CosdistCase:
    batch: int
    chw: tuple[int, int, int]
    dtype: torch.dtype

    @property
    def id(self) -> str:
        c, h, w = self.chw
        return f"B{self.batch}-C{c}x{h}x{w}-{DTYPE_NAMES[self.dtype]}"

    @property
    def shape(self) -> list[int]:
        return [self.batch, *self.chw]


def _params(workload: str, cases) -> list:
    """(case, backend) pairs, baselines first within each case; one pytest-benchmark group per case."""
    return [
        pytest.param(case, backend, id=f"{case.id}-{backend}", marks=pytest.mark.benchmark(group=f"{workload}-{case.id}"))
        for case in cases
        for backend in BACKENDS
    ]


_B, _SCALES, _OUT = COSMAP_SIZES[SIZE]
COSMAP_CASES = [CosmapCase(_B, _SCALES, _OUT, dt) for dt in DTYPES]
_B, _MAPS = COSDIST_SIZES[SIZE]
COSDIST_CASES = [CosdistCase(_B, chw, dt) for chw in _MAPS for dt in DTYPES]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _generator(seed_text: str) -> torch.Generator:
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(zlib.crc32(seed_text.encode()))
    return gen


def _randn(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32)


def _feature_pair(shape, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher/student pair: random features and a noisy copy (never zeros), in ``dtype``."""
    a = _randn(shape, gen)
    b = a + FEATURE_NOISE * _randn(shape, gen)
    return a.to(dtype), b.to(dtype)


def _describe(bench, workload: str, case, backend: str, **more) -> None:
    bench.describe(workload=workload, case=case.id, backend=backend, dtype=case.dtype, device=DEVICE, size=SIZE, **more)


# --------------------------------------------------------------------------------------------
# cosmap: cosine_distance_map forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,backend", _params("cosmap", COSMAP_CASES))
def test_cosmap(benchmark, fastuad_bench, case: CosmapCase, backend: str):
    bench = fastuad_bench
    params = {"out_size": [case.out_size, case.out_size], "reduction": REDUCTION, "blur_sigma": BLUR_SIGMA}
    _describe(bench, "cosmap", case, backend, shapes=case.shapes, params=params)

    gen = _generator(f"cosmap-{case.id}")
    pairs = [_feature_pair(shape, case.dtype, gen) for shape in case.shapes]
    feats_a = [a for a, _ in pairs]
    feats_b = [b for _, b in pairs]
    kwargs = dict(out_size=case.out_size, reduction=REDUCTION, blur_sigma=BLUR_SIGMA)
    bytes_read = sum(t.numel() * t.element_size() for t in feats_a + feats_b)

    with torch.no_grad():
        expected = cosine_distance_map_reference(feats_a, feats_b, **kwargs)

    if backend == "compile":
        op = bench.compile(cosine_distance_map_reference)
    else:
        name = OP_BACKEND[backend]
        bench.require(
            "cosine_distance_map",
            COSINE_DISTANCE_MAP_BACKENDS,
            name,
            feats_a + feats_b,
            radius=gaussian_radius(BLUR_SIGMA),
            num_scales=len(feats_a),
        )

        def op(fa, fb, **kw):
            return cosine_distance_map(fa, fb, backend=name, **kw)

    def run():
        with torch.no_grad():
            return op(feats_a, feats_b, **kwargs)

    out = bench.first_call(run, compiled=backend == "compile")
    assert out.dtype == torch.float32, f"the anomaly map must be float32, got {out.dtype}"
    bench.assert_close("map", out, expected, ATOL[case.dtype])
    del out

    bench.measure(run, device=DEVICE, bytes_read=bytes_read, bytes_label="bytes_read")


# --------------------------------------------------------------------------------------------
# cosdist: cosine_distance forward + backward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,backend", _params("cosdist", COSDIST_CASES))
def test_cosdist(benchmark, fastuad_bench, case: CosdistCase, backend: str):
    bench = fastuad_bench
    _describe(bench, "cosdist", case, backend, shapes=[case.shape], params={"eps": 1e-8, "pass": "fwd+bwd"})

    gen = _generator(f"cosdist-{case.id}")
    a, b = _feature_pair(case.shape, case.dtype, gen)
    a.requires_grad_(True)
    b.requires_grad_(True)
    g = _randn([case.batch, case.chw[1], case.chw[2]], gen)  # upstream gradient of the [B, H, W] loss map
    # What a fused fwd+bwd must move at least: the forward reads a and b, the backward reads
    # them again and writes both gradients.
    bytes_min = 6 * a.numel() * a.element_size()

    def fwd_bwd(fn):
        d = fn(a, b)
        ga, gb = torch.autograd.grad((d * g).sum(), (a, b))
        return d.detach(), ga, gb

    expected = fwd_bwd(cosine_distance_reference)

    if backend == "compile":
        op = bench.compile(cosine_distance_reference)
    else:
        name = OP_BACKEND[backend]
        bench.require("cosine_distance", COSINE_DISTANCE_BACKENDS, name, (a, b))

        def op(x, y):
            return cosine_distance(x, y, backend=name)

    def run():
        return fwd_bwd(op)

    d, ga, gb = bench.first_call(run, compiled=backend == "compile")
    tol = ATOL[case.dtype]
    bench.assert_close("distance", d, expected[0], tol)
    bench.assert_close("grad_a", ga, expected[1], tol, scale=True)
    bench.assert_close("grad_b", gb, expected[2], tol, scale=True)
    del d, ga, gb, expected

    bench.measure(run, device=DEVICE, bytes_read=bytes_min, bytes_label="bytes_min")
