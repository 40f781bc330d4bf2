"""pytest-benchmark harness for fastuad: check against the reference first, then time.

Every benchmark goes through :class:`BenchHarness` (the ``fastuad_bench`` fixture):

1. ``require(...)`` skips, with the backend's own ``not_supported_reasons``, a backend that
   cannot run here (Triton on a CPU without ``TRITON_INTERPRET=1``, CUDA without the built
   extension, ...); ``compile(...)`` wraps a reference in ``torch.compile`` and ``first_call``
   skips with the error when compilation fails.
2. ``assert_close(...)`` holds the result to the eager reference before anything is timed.
3. ``measure(...)`` warms up, times with ``benchmark.pedantic`` (on CUDA the timed function
   ends with ``torch.cuda.synchronize()``), and attaches ``extra_info``: workload, backend,
   dtype, shapes, device, bandwidth, speedups over the eager and compiled baselines measured
   earlier in the session, and on CUDA the peak memory and a back-to-back (pipelined) time.

Rounds follow pytest-benchmark's own options: ``max(--benchmark-min-rounds,
--benchmark-max-time / one call)``, capped at ``MAX_ROUNDS``. Under the Triton interpreter a
benchmark runs at most ``--benchmark-min-rounds`` rounds and no warm-up (its times mean
nothing; it proves the code path).

``--fastuad-results PATH`` writes every record, the environment and the skips to one JSON file,
headed by the git commit measured (``git_commit``) and whether the tree had uncommitted changes
(``git_dirty``);
a compact table is printed at the end of every session.

Environment: ``FASTUAD_PEAK_GBPS`` (the device's peak memory bandwidth in GB/s, e.g. 3350 for an
H100 SXM) adds ``bandwidth_fraction``. Workload sizes are chosen in the benchmark modules
(``FASTUAD_BENCH_SIZE``, ``FASTUAD_BENCH_TINY``, ``FASTUAD_BENCH_DEVICE``; see README.md).

This file imports only torch (never triton, never a GPU) so CPU-only CI can collect it.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import torch

# Baselines a fused backend is compared with; benchmarks run them first in each case.
BASELINES = ("eager", "compile")
MAX_ROUNDS = 5000
WARMUP_SECONDS = {"cuda": 0.2, "cpu": 0.05}
MAX_WARMUP_ROUNDS = 50
BACK_TO_BACK_CALLS = 100


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def triton_version() -> str | None:
    try:
        import triton  # noqa: PLC0415
    except ImportError:
        return None
    return getattr(triton, "__version__", "unknown")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def peak_gbps() -> float | None:
    value = os.environ.get("FASTUAD_PEAK_GBPS", "").strip()
    if not value:
        return None
    try:
        peak = float(value)
    except ValueError:
        raise pytest.UsageError(f"FASTUAD_PEAK_GBPS must be a number of GB/s, got {value!r}") from None
    return peak if peak > 0 else None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def git_dirty() -> bool | None:
    """Whether the work tree the benchmarks ran from has uncommitted changes to tracked files."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def environment(store: ResultStore | None = None) -> dict[str, Any]:
    """What the results were measured on (no host name)."""
    import fastuad  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    used = sorted({r["device_name"] for r in (store.records + store.skipped if store else []) if "device_name" in r})
    env: dict[str, Any] = {
        "device": " + ".join(used) if used else (torch.cuda.get_device_name() if cuda else cpu_name()),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "fastuad": getattr(fastuad, "__version__", None),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "triton_interpret": triton_interpret(),
        "peak_GBps": peak_gbps(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["cuda_capability"] = f"{props.major}.{props.minor}"
        env["cuda_memory_bytes"] = props.total_memory
        env["cuda_multiprocessors"] = props.multi_processor_count
    return env


# --------------------------------------------------------------------------------------------
# Session store
# --------------------------------------------------------------------------------------------


@dataclass
class ResultStore:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # (workload, case) -> {backend: median seconds}, for the speedup columns.
    medians: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)


STORE_KEY = pytest.StashKey[ResultStore]()


def pytest_addoption(parser):
    group = parser.getgroup("fastuad", "fastuad benchmarks")
    group.addoption(
        "--fastuad-results",
        metavar="PATH",
        default=None,
        help="write the fastuad benchmark records (and environment, skips) to this JSON file",
    )


def pytest_configure(config):
    config.stash[STORE_KEY] = ResultStore()


# --------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------


class BenchHarness:
    """Check-then-time helper bound to one test's ``benchmark`` fixture."""

    def __init__(self, benchmark, request, store: ResultStore):
        self.benchmark = benchmark
        self.request = request
        self.config = request.config
        self.store = store
        self.context: dict[str, Any] = {}
        self.errors: dict[str, float] = {}
        self.tolerances: dict[str, float] = {}

    # -- identity ---------------------------------------------------------------------------

    def describe(self, *, workload: str, case: str, backend: str, dtype: torch.dtype, device: torch.device, **more):
        """Name what this benchmark measures; used by skips, records and ``extra_info``."""
        self.context = {
            "workload": workload,
            "case": case,
            "backend": backend,
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(device),
            "device_name": device_name(device),
            **more,
        }
        self.benchmark.extra_info.update(self.context)

    def skip(self, reason: str):
        self.store.skipped.append({**self.context, "reason": reason, "test": self.request.node.nodeid})
        pytest.skip(reason)

    # -- backends ---------------------------------------------------------------------------

    def require(self, op: str, backends: dict, name: str, tensors: Sequence[torch.Tensor], **kwargs) -> None:
        """Skip unless ``backends[name]`` can run ``tensors`` (its ``not_supported_reasons``)."""
        impl = backends.get(name)
        if impl is None:
            self.skip(f"{op} has no {name!r} backend (it has: {', '.join(sorted(backends))})")
        reasons = impl.not_supported_reasons(list(tensors), **kwargs)
        if reasons:
            if name == "triton" and triton_version() and not triton_interpret() and any(not t.is_cuda for t in tensors):
                reasons.append("set TRITON_INTERPRET=1 to run the Triton kernels on CPU (slowly)")
            self.skip(f"{op} backend={name!r}: " + "; ".join(reasons))

    def compile(self, fn: Callable) -> Callable:
        """``torch.compile(fn, dynamic=False)`` (default mode) from a clean dynamo state."""
        if not hasattr(torch, "compile"):
            self.skip("torch.compile is not available in this torch")
        torch._dynamo.reset()  # every case compiles afresh: no recompile limits, no stale guards
        try:
            return torch.compile(fn, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - any failure to compile is a skip, not an error
            self.skip(f"torch.compile failed: {type(exc).__name__}: {_first_line(exc)}")

    def first_call(self, fn: Callable, *, compiled: bool = False):
        """Run ``fn`` once (this compiles ``torch.compile`` wrappers); a compile failure skips."""
        if not compiled:
            return fn()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            self.skip(f"torch.compile failed: {type(exc).__name__}: {_first_line(exc)}")

    # -- correctness ------------------------------------------------------------------------

    def assert_close(self, name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, *, scale: bool = False):
        """``|actual - expected| <= atol`` elementwise, compared in float64.

        With ``scale=True`` the tolerance is ``atol * max|expected|`` (gradients: their size is
        set by the features' norms, so a bare absolute tolerance would test nothing).
        """
        assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != reference {expected.dtype}"
        a = actual.detach().double()
        e = expected.detach().double()
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        tol = atol * max(float(e.abs().max()), 1e-30) if scale else atol
        err = float((a - e).abs().max())
        self.errors[name] = err
        self.tolerances[name] = tol
        assert err <= tol, f"{name}: max |error| {err:.3e} exceeds tolerance {tol:.3e} against the eager reference"
        return err

    # -- timing -----------------------------------------------------------------------------

    def measure(
        self,
        fn: Callable[[], Any],
        *,
        device: torch.device,
        bytes_read: int | None = None,
        bytes_label: str = "bytes_read",
        extra: dict[str, Any] | None = None,
        max_rounds: int | None = None,
    ) -> None:
        """Time ``fn`` (already checked and warm) and record the result.

        ``bytes_read`` is the traffic the op cannot avoid; ``achieved_GBps`` divides it by the
        median time. ``bytes_label`` names it in the record. ``max_rounds`` caps the rounds (and
        the warm-up at one round) for workloads whose one call takes seconds on a CPU (``e2e``).
        """
        on_cuda = device.type == "cuda"
        interpreted = device.type == "cpu" and self.context.get("backend") == "triton" and triton_interpret()

        if on_cuda:

            def timed():
                fn()
                torch.cuda.synchronize(device)

        else:
            timed = fn

        # One probe call sets the number of rounds (the first call, with any compilation, is done).
        t0 = time.perf_counter()
        timed()
        one = max(time.perf_counter() - t0, 1e-7)
        min_rounds = int(self.config.getoption("benchmark_min_rounds") or 1)
        max_time = float(self.config.getoption("benchmark_max_time") or 1.0)
        if interpreted:
            rounds = max(1, min(min_rounds, math.ceil(max_time / one)))
            warmup = 0
        else:
            rounds = min(max(min_rounds, math.ceil(max_time / one)), MAX_ROUNDS)
            warmup = min(max(2, math.ceil(WARMUP_SECONDS.get(device.type, 0.05) / one)), MAX_WARMUP_ROUNDS)
        if max_rounds is not None:
            rounds, warmup = max(1, min(rounds, max_rounds)), min(warmup, 1)

        peak_mem = peak_extra = None
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            timed()
            peak_mem = torch.cuda.max_memory_allocated(device)
            peak_extra = peak_mem - base

        self.benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
        meta = self.benchmark.stats
        if meta is None:  # --benchmark-disable: the function ran once, nothing was timed
            return
        stats = meta.stats
        median = float(stats.median)

        back_to_back = None
        if on_cuda:
            # Calls queued without a sync in between: launch overhead hides behind the GPU work.
            n = max(1, min(rounds, BACK_TO_BACK_CALLS))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            back_to_back = start.elapsed_time(end) / 1e3 / n

        key = (self.context["workload"], self.context["case"])
        backend = self.context["backend"]
        medians = self.store.medians.setdefault(key, {})
        medians[backend] = median
        speedups = {f"speedup_vs_{b}": (medians[b] / median if b in medians else None) for b in BASELINES}

        achieved = fraction = achieved_b2b = None
        if bytes_read:
            achieved = bytes_read / median / 1e9
            achieved_b2b = bytes_read / back_to_back / 1e9 if back_to_back else None
            peak = peak_gbps()
            fraction = achieved / peak if peak else None

        record: dict[str, Any] = {
            **self.context,
            **(extra or {}),
            "median_s": median,
            "mean_s": float(stats.mean),
            "stddev_s": float(stats.stddev),
            "min_s": float(stats.min),
            "rounds": int(stats.rounds),
            "warmup_rounds": warmup,
            **speedups,
            bytes_label: bytes_read,
            "achieved_GBps": achieved,
            "back_to_back_s": back_to_back,
            "achieved_GBps_back_to_back": achieved_b2b,
            "peak_mem_bytes": peak_mem,
            "peak_mem_extra_bytes": peak_extra,
            "max_abs_err": dict(self.errors),
            "tolerance": dict(self.tolerances),
            "interpreted": interpreted,
            "test": self.request.node.nodeid,
        }
        if fraction is not None:
            record["bandwidth_fraction"] = fraction
        self.store.records.append(record)
        self.benchmark.extra_info.update({k: v for k, v in record.items() if k not in ("test",) and v is not None})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


@pytest.fixture
def fastuad_bench(benchmark, request) -> BenchHarness:
    return BenchHarness(benchmark, request, request.config.stash[STORE_KEY])


# --------------------------------------------------------------------------------------------
# Results file and summary table
# --------------------------------------------------------------------------------------------


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("fastuad_results", None)
    if not path:
        return
    store = session.config.stash.get(STORE_KEY, None)
    if store is None:
        return
    env = environment(store)
    # The commit at the top level too: a result file says which code it measured at a glance.
    doc = {
        "git_commit": env["git_commit"],
        "git_dirty": env["git_dirty"],
        "environment": env,
        "records": store.records,
        "skipped": store.skipped,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_lines(store: ResultStore) -> list[str]:
    header = ("workload", "case", "backend", "median", "b2b", "x eager", "x compile", "GB/s", "peak MiB", "max err")
    rows = [header]
    for r in store.records:
        err = max(r["max_abs_err"].values()) if r.get("max_abs_err") else None
        backend = r["backend"] + (" (interp)" if r.get("interpreted") else "")
        rows.append(
            (
                r["workload"],
                r["case"],
                backend,
                _fmt_time(r["median_s"]),
                _fmt_time(r.get("back_to_back_s")),
                _fmt(r.get("speedup_vs_eager"), ".2f"),
                _fmt(r.get("speedup_vs_compile"), ".2f"),
                _fmt(r.get("achieved_GBps"), ".1f"),
                _fmt(r["peak_mem_bytes"] / 2**20 if r.get("peak_mem_bytes") is not None else None, ".1f"),
                _fmt(err, ".1e"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    seen = set()
    for s in store.skipped:
        key = (s.get("backend"), s["reason"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"skipped {s.get('backend', '?')}: {s['reason']}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    store = config.stash.get(STORE_KEY, None)
    if store is None or not (store.records or store.skipped):
        return
    env_device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    terminalreporter.write_sep("-", f"fastuad benchmarks on {env_device} (torch {torch.__version__})")
    for line in summary_lines(store):
        terminalreporter.write_line(line)
    path = config.getoption("fastuad_results", None)
    if path:
        terminalreporter.write_line(f"results written to {path}")
