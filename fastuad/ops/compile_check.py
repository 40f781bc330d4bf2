"""Ahead-of-time compile check: every Triton kernel of ``fastuad.ops`` built for real GPUs, no GPU needed.

``python -m fastuad.ops.compile_check [--arch 80,90] [--json OUT]`` imports every module of
``fastuad.ops``, collects the :class:`~fastuad.ops._compile.CompileTarget` list of each module
that defines ``compile_targets()`` (the launch configurations its launchers choose on a GPU, for
the DESIGN.md workloads and the models' shapes; a module whose launchers pick per architecture
takes ``compile_targets(arch)``, ``arch`` as ``major * 10 + minor``, and lists that GPU's
launches), compiles each distinct one with the real Triton compiler for each architecture, and
reads registers, stack frame (spills) and shared memory from
the cubin with ``cuobjdump --dump-resource-usage`` (shipped with Triton). It prints one row per
kernel launch configuration and architecture:

``kernel  config  workload  arch  regs  stack  shared  compile_s  hot``

``hot`` marks the configurations of the DESIGN.md benchmark workloads. The exit status is 1 if a
compile fails, if a kernel asks for more shared memory than the architecture gives one block, or
(``--fail-on-hot-spill``, on by default) if a hot row has a stack frame (spilled registers);
``--no-fail-on-hot-spill`` only reports them. ``--json OUT`` writes the rows as a JSON list.

Kernels compiled under ``TRITON_INTERPRET`` would be interpreted, not compiled: when the variable
is set, the check re-runs itself in a child process without it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["collect_targets", "compile_target", "main", "SHARED_LIMITS"]

# Largest shared memory one block may use (the opt-in maximum), bytes.
SHARED_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_CHILD_FLAG = "FASTUAD_COMPILE_CHECK_CHILD"
_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


@dataclass
class Planned:
    """One distinct compile: where its target comes from and every workload that launches it."""

    module: str
    index: int
    kernel: str
    config: str
    workloads: list[str]
    hot: bool
    num_warps: int
    num_stages: int


def _op_modules() -> list[str]:
    import fastuad.ops  # noqa: PLC0415

    names = []
    for info in pkgutil.iter_modules(fastuad.ops.__path__):
        if info.name != "compile_check":
            names.append(f"fastuad.ops.{info.name}")
    return sorted(names)


def _takes_arch(fn) -> bool:
    """Whether a ``compile_targets`` lists per-architecture launches (has an ``arch`` parameter)."""
    try:
        return "arch" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _module_targets(module: str, arch: int | None = None) -> tuple:
    """``module.compile_targets(arch)``, or ``compile_targets()`` where the module's launches do
    not depend on the architecture (its signature has no ``arch``)."""
    mod = importlib.import_module(module)
    fn = getattr(mod, "compile_targets", None)
    if not callable(fn):
        return ()
    return tuple(fn(arch) if arch is not None and _takes_arch(fn) else fn())


def _key(t) -> tuple:
    return (
        t.name,
        getattr(getattr(t.kernel, "fn", t.kernel), "__module__", ""),
        tuple(sorted(t.signature.items())),
        tuple(sorted((k, repr(v)) for k, v in t.constexprs.items())),
        t.num_warps,
        t.num_stages,
        tuple(sorted(getattr(t, "divisible_by_16", ()))),
        tuple(sorted((k, repr(v)) for k, v in t.options.items())),
    )


def collect_targets(
    modules: Sequence[str] | None = None, kernel: str | None = None, arch: int | None = None
) -> list[Planned]:
    """Distinct launch configurations of every op module's ``compile_targets()`` on ``arch``
    (None: each module's default, sm_90).

    Targets equal in kernel, signature, constexprs, warps, stages and options compile to the
    same binary: they become one entry listing all their workloads, hot if any of them is.
    """
    planned: dict[tuple, Planned] = {}
    for module in modules or _op_modules():
        for i, t in enumerate(_module_targets(module, arch)):
            if kernel and kernel not in t.name:
                continue
            key = _key(t)
            if key in planned:
                p = planned[key]
                if t.workload not in p.workloads:
                    p.workloads.append(t.workload)
                p.hot = p.hot or t.hot
            else:
                planned[key] = Planned(module, i, t.name, t.config, [t.workload], t.hot, t.num_warps, t.num_stages)
    return list(planned.values())


# --------------------------------------------------------------------------------------------
# Compiling one target
# --------------------------------------------------------------------------------------------


def _nvidia_bin(tool: str) -> Path:
    import triton  # noqa: PLC0415

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool


def _resources_cuobjdump(cubin: Path) -> dict[str, int] | None:
    tool = _nvidia_bin("cuobjdump")
    if not tool.exists():
        return None
    out = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, timeout=120)
    m = _RESOURCE.search(out.stdout)
    if out.returncode != 0 or m is None:
        return None
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack_bytes": stack, "cubin_shared_bytes": shared, "local_bytes": local}


def _resources_ptxas(ptx: str, arch: int, workdir: Path) -> dict[str, int] | None:
    """Fallback: ``ptxas -v`` on the PTX prints registers and the stack frame."""
    tool = _nvidia_bin("ptxas")
    if not tool.exists():
        return None
    src = workdir / "k.ptx"
    src.write_text(ptx)
    suffix = "a" if arch >= 90 else ""
    out = subprocess.run(
        [str(tool), f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(workdir / "k.o")],
        capture_output=True, text=True, timeout=300,
    )
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    if regs is None:
        return None
    return {"regs": int(regs.group(1)), "stack_bytes": int(stack.group(1)) if stack else 0}


def compile_target(module: str, index: int, arch: int) -> dict[str, Any]:
    """Compile target ``index`` of ``module.compile_targets()`` for ``sm_<arch>``; its resource row."""
    if _interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: kernels would be interpreted, not compiled")
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    t = _module_targets(module, arch)[index]
    fn = t.kernel
    # What Triton's JIT specialises a real launch on: the arguments that are multiples of 16.
    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in getattr(t, "divisible_by_16", ())}
    src = ASTSource(fn=fn, signature=dict(t.signature), constexprs=dict(t.constexprs), attrs=attrs)
    options = {"num_warps": t.num_warps, "num_stages": t.num_stages, **t.options}
    row: dict[str, Any] = {"regs": None, "stack_bytes": None, "shared_bytes": None, "error": None}
    start = time.perf_counter()
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - every compile failure is a failed row
        row["compile_s"] = time.perf_counter() - start
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        row["error"] = f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]
        return row
    row["compile_s"] = time.perf_counter() - start
    row["shared_bytes"] = int(compiled.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        res = _resources_cuobjdump(cubin) or _resources_ptxas(compiled.asm["ptx"], arch, Path(tmp))
    if res is None:
        row["error"] = "compiled, but neither cuobjdump nor ptxas could read its resource usage"
    else:
        row.update(res)
    return row


def _compile_job(job: tuple[str, int, int, str]) -> dict[str, Any]:
    module, index, arch, cache = job
    os.environ["TRITON_CACHE_DIR"] = cache
    return compile_target(module, index, arch)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _row_problems(row: dict[str, Any], fail_on_hot_spill: bool) -> list[str]:
    problems = []
    if row["error"]:
        problems.append(f"compile failed: {row['error']}")
    limit = SHARED_LIMITS[row["arch"]]
    if row["shared_bytes"] is not None and row["shared_bytes"] > limit:
        problems.append(f"shared memory {row['shared_bytes']} B exceeds the sm_{row['arch']} per-block limit {limit} B")
    if fail_on_hot_spill and row["hot"] and (row["stack_bytes"] or 0) > 0:
        problems.append(f"hot configuration spills: {row['stack_bytes']} B stack frame")
    return problems


def format_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    header = ("kernel", "config", "workload", "arch", "regs", "stack", "shared", "compile_s", "hot")
    lines = [header]
    for r in rows:
        wl = r["workload"] + (f" (+{len(r['workloads']) - 1})" if len(r["workloads"]) > 1 else "")
        lines.append(
            (
                r["kernel"],
                r["config"],
                wl,
                f"sm_{r['arch']}",
                "-" if r["regs"] is None else str(r["regs"]),
                "-" if r["stack_bytes"] is None else str(r["stack_bytes"]),
                "-" if r["shared_bytes"] is None else str(r["shared_bytes"]),
                f"{r['compile_s']:.2f}",
                "hot" if r["hot"] else "",
            )
        )
    widths = [max(len(x[i]) for x in lines) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) if 4 <= i <= 7 else c.ljust(w) for i, (c, w) in enumerate(zip(x, widths))).rstrip() for x in lines]
    out.insert(1, "-" * max(len(x) for x in out))
    return out


def _parse_archs(text: str) -> list[int]:
    archs = []
    for part in text.split(","):
        part = part.strip().lower().removeprefix("sm_")
        if not part.isdigit() or int(part) not in SHARED_LIMITS:
            raise argparse.ArgumentTypeError(
                f"--arch takes a comma-separated list of {', '.join(map(str, SHARED_LIMITS))}, got {text!r}"
            )
        archs.append(int(part))
    return archs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastuad.ops.compile_check",
        description="Compile every Triton kernel of fastuad.ops for NVIDIA GPUs (no GPU needed) and report "
        "registers, stack (spills) and shared memory per launch configuration.",
    )
    p.add_argument(
        "--arch",
        type=_parse_archs,
        default=[90],
        help="architectures, e.g. 80,90 (default: 90, the H100/H200 the launch heuristics and benchmarks target)",
    )
    p.add_argument("--json", metavar="OUT", help="write the rows as a JSON list to OUT")
    p.add_argument(
        "--fail-on-hot-spill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exit 1 if a hot (benchmark-workload) configuration has a stack frame (default: on)",
    )
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default: 2)")
    p.add_argument("--kernel", help="only kernels whose name contains this text")
    p.add_argument("--module", action="append", help="only this op module (e.g. cosdist); repeatable")
    p.add_argument("--limit", type=int, help="compile at most this many distinct configurations (smoke runs)")
    return p


def _reexec_without_interpreter(argv: Sequence[str]) -> int:
    if os.environ.get(_CHILD_FLAG):
        print("compile_check: TRITON_INTERPRET is still set in the child process; unset it and retry", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[_CHILD_FLAG] = "1"
    print("compile_check: TRITON_INTERPRET is set (kernels would be interpreted); re-running without it", file=sys.stderr)
    return subprocess.run([sys.executable, "-m", "fastuad.ops.compile_check", *argv], env=env).returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from fastuad.ops._dispatch import TRITON_INTERPRET  # noqa: PLC0415

    if _interpreting() or TRITON_INTERPRET:
        return _reexec_without_interpreter(argv)
    try:
        importlib.import_module("triton")  # present and importable; the compiles import it themselves
    except ImportError:
        print("compile_check: triton is not installed", file=sys.stderr)
        return 2
    modules = [m if m.startswith("fastuad.") else f"fastuad.ops.{m}" for m in args.module] if args.module else None
    t0 = time.perf_counter()
    planned = {arch: collect_targets(modules, args.kernel, arch) for arch in args.arch}
    if args.limit is not None:
        planned = {arch: p[: args.limit] for arch, p in planned.items()}
    if not any(planned.values()):
        print("compile_check: no compile targets matched", file=sys.stderr)
        return 2
    jobs_list = [(p, arch) for arch in args.arch for p in planned[arch]]
    with tempfile.TemporaryDirectory(prefix="fastuad-compile-check-") as cache:
        work = [(p.module, p.index, arch, cache) for p, arch in jobs_list]
        if args.jobs > 1 and len(work) > 2:
            import multiprocessing  # noqa: PLC0415

            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_compile_job, work))
        else:
            results = [_compile_job(w) for w in work]
    rows = []
    for (p, arch), res in zip(jobs_list, results):
        rows.append(
            {
                "kernel": p.kernel,
                "module": p.module,
                "config": p.config,
                "workload": p.workloads[0],
                "workloads": p.workloads,
                "arch": arch,
                "num_warps": p.num_warps,
                "num_stages": p.num_stages,
                "hot": p.hot,
                **res,
            }
        )
    rows.sort(key=lambda r: (r["arch"], r["module"], r["kernel"], not r["hot"], r["config"]))
    for line in format_table(rows):
        print(line)
    failures = [(r, msg) for r in rows for msg in _row_problems(r, args.fail_on_hot_spill)]
    spills = [r for r in rows if (r["stack_bytes"] or 0) > 0]
    total = sum(r["compile_s"] for r in rows)
    print(
        f"\n{len(rows)} compiles ({', '.join(f'{len(p)} configurations for sm_{a}' for a, p in planned.items())}), "
        f"{sum(r['hot'] for r in rows)} hot; {len(spills)} with a stack frame "
        f"({sum(r['hot'] for r in spills)} hot); compile {total:.1f} s, wall {time.perf_counter() - t0:.1f} s"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    for r, msg in failures:
        print(f"FAIL {r['kernel']} [{r['config']}] sm_{r['arch']}: {msg}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
