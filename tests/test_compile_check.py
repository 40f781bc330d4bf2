"""The AOT compile check covers every kernel; the shared dispatch, precision and launch helpers."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastuad.ops
from fastuad.ops import BackendUnavailableError
from fastuad.ops._compile import launch_target
from fastuad.ops._dispatch import Backend, select_backend, standard_backends
from fastuad.ops._launch import dot_precision, dot_precision_for, gpu_tiles, interpreter_tiles
from fastuad.ops.compile_check import SHARED_LIMITS, collect_targets

ROOT = Path(__file__).resolve().parents[1]

try:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    KERNEL_TYPES: tuple[type, ...] = (JITFunction, InterpretedFunction)
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    KERNEL_TYPES = ()

needs_triton = pytest.mark.skipif(not KERNEL_TYPES, reason="triton is not installed")


def _op_modules():
    for info in pkgutil.iter_modules(fastuad.ops.__path__):
        if info.name != "compile_check":
            yield importlib.import_module(f"fastuad.ops.{info.name}")


def kernel_entry_points(module) -> set[str]:
    """``@triton.jit`` functions defined in ``module`` that the host launches (``name[grid](...)``)."""
    source = inspect.getsource(module)
    names = set()
    for name, obj in vars(module).items():
        if not isinstance(obj, KERNEL_TYPES):
            continue
        fn = getattr(obj, "fn", obj)
        if getattr(fn, "__module__", None) != module.__name__:
            continue
        if re.search(rf"\b{re.escape(name)}\[", source):
            names.add(name)
    return names


@needs_triton
def test_introspection_finds_the_kernels_it_should():
    from fastuad.ops import cosdist, cosmap

    assert kernel_entry_points(cosdist) == {"_cos_fwd_kernel", "_cos_finalize_kernel", "_cos_bwd_kernel"}
    # Helpers called only from kernels (_reflect, _combined_map) are not entry points.
    assert kernel_entry_points(cosmap) == {"_cosmap_gather_kernel", "_cosmap_linear_kernel"}


OP_MODULES = sorted(info.name for info in pkgutil.iter_modules(fastuad.ops.__path__) if info.name != "compile_check")


def test_the_op_modules_launch_kernels():
    assert sum(len(kernel_entry_points(m)) for m in _op_modules()) >= 5 if KERNEL_TYPES else True


@needs_triton
@pytest.mark.parametrize("name", OP_MODULES)
def test_every_kernel_entry_point_has_a_compile_target(name):
    """A kernel added to fastuad/ops without a compile target fails here."""
    module = importlib.import_module(f"fastuad.ops.{name}")
    entries = kernel_entry_points(module)
    if not entries:
        return  # no Triton kernels launched here (helpers, dispatch, validation)
    assert callable(getattr(module, "compile_targets", None)), f"{module.__name__} launches {sorted(entries)} but has no compile_targets()"
    covered = {t.name for t in module.compile_targets()}
    missing = sorted(entries - covered)
    assert not missing, f"{module.__name__}: kernels without a compile target (add them to compile_targets()): {missing}"


def test_cosmap_and_cosdist_targets_are_the_launchers_gpu_choices():
    from fastuad.ops import cosdist, cosmap

    targets = cosdist.compile_targets() + cosmap.compile_targets()
    hot = {(t.name, t.workload) for t in targets if t.hot}
    assert ("_cos_bwd_kernel", "cosdist B32 C1024x16x16") in hot
    assert ("_cosmap_linear_kernel", "cosmap B32 float16") in hot and ("_cosmap_linear_kernel", "cosmap B32 float32") in hot
    assert not any(t.hot for t in targets if t.workload.startswith("rd4ad"))
    # The targets come from the heuristics at their GPU settings, even under the interpreter.
    lin = next(t for t in targets if t.name == "_cosmap_linear_kernel")
    assert (lin.constexprs["TY"], lin.constexprs["TX"], lin.constexprs["KC"], lin.num_warps) == (64, 64, 16, 8)
    assert lin.constexprs["DOT_PRECISION"] == "tf32x3"
    fwd = next(t for t in targets if t.name == "_cos_fwd_kernel" and t.workload == "cosdist B32 C256x64x64")
    with gpu_tiles():
        plan = cosdist._forward_plan(32, 256, 64, 64, torch.device("cuda"), None, sms=132)
    assert (fwd.constexprs["BLOCK_P"], fwd.constexprs["BLOCK_C"], fwd.num_warps) == plan[:3]
    # The runtime's specialisation: unit strides become constexprs, multiples of 16 are marked.
    assert fwd.signature["sa_w"] == "constexpr" and fwd.constexprs["sa_w"] == 1
    assert "sa_c" in fwd.divisible_by_16 and fwd.signature["a_ptr"] in ("*fp16", "*fp32")
    # Identical launches from several workloads compile once.
    planned = collect_targets(["fastuad.ops.cosdist", "fastuad.ops.cosmap"])
    assert len(planned) < len(targets)
    assert any(len(p.workloads) > 1 for p in planned)


def test_launch_target_types_arguments_like_the_runtime():
    from fastuad.ops.cosdist import _cos_finalize_kernel

    t = launch_target(
        _cos_finalize_kernel, dict(part_ptr="*fp32", d_ptr="*fp32", coef_ptr="*fp32", N=2**31 + 16, eps=1e-8),
        dict(SPLIT=2, WRITE_COEF=False, ACC=None, BLOCK=1024), num_warps=4, config="c", workload="w",
    )
    assert t.signature["N"] == "i64" and t.signature["eps"] == "fp32" and t.signature["SPLIT"] == "constexpr"
    assert t.divisible_by_16 == ("part_ptr", "d_ptr", "coef_ptr", "N")
    with pytest.raises(KeyError, match="eps"):
        launch_target(_cos_finalize_kernel, dict(part_ptr="*fp32", d_ptr="*fp32", coef_ptr="*fp32", N=3), {}, num_warps=4, config="", workload="")


@needs_triton
def test_real_compile_in_a_process_without_the_interpreter(tmp_path):
    """One small target compiled for sm_90 by the real compiler, through the CLI, in a clean process."""
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fastuad.ops.compile_check", "--arch", "90", "--module", "cosmap",
         "--kernel", "_cos_finalize_kernel", "--limit", "1", "--jobs", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    row = rows[0]
    assert {"kernel", "config", "workload", "arch", "regs", "stack_bytes", "shared_bytes", "hot", "compile_s"} <= set(row)
    assert row["kernel"] == "_cos_finalize_kernel" and row["arch"] == 90 and row["error"] is None
    assert 0 < row["regs"] <= 255 and row["stack_bytes"] == 0
    assert 0 <= row["shared_bytes"] <= SHARED_LIMITS[90]
    assert row["hot"] is False and row["compile_s"] > 0
    assert "_cos_finalize_kernel" in proc.stdout and "sm_90" in proc.stdout


def test_compile_targets_per_arch_contract():
    """A module whose ``compile_targets`` takes ``arch`` is planned per architecture; the others
    (no parameter) give the same launches for every architecture."""
    from fastuad.ops import compile_check
    from fastuad.ops.knn_search import knn_config

    assert compile_check._takes_arch(fastuad.ops.knn_search.compile_targets)
    assert compile_check._takes_arch(fastuad.ops.local_attn.compile_targets)
    assert not compile_check._takes_arch(fastuad.ops.memory.compile_targets)
    knn80 = collect_targets(["fastuad.ops.knn_search"], arch=80)
    knn90 = collect_targets(["fastuad.ops.knn_search"], arch=90)
    assert [p.config for p in knn90] == [p.config for p in collect_targets(["fastuad.ops.knn_search"])]
    cfg80 = knn_config(1, 1536, torch.float32, gpu=True, arch=80)
    hot80 = next(p for p in knn80 if p.hot and p.config.startswith("fp32 KP=1 "))
    assert f"x{cfg80.block_d} w{cfg80.num_warps}" in hot80.config and hot80.num_warps == cfg80.num_warps
    assert {p.config for p in knn80} != {p.config for p in knn90}
    # Each plan's index points into that architecture's target list.
    t80 = compile_check._module_targets(hot80.module, 80)[hot80.index]
    assert t80.config == hot80.config and t80.constexprs["BLOCK_D"] == cfg80.block_d
    mem = ["fastuad.ops.memory"]
    assert [(p.config, p.index) for p in collect_targets(mem, arch=80)] == [(p.config, p.index) for p in collect_targets(mem, arch=90)]


@needs_triton
def test_sm80_knn_hot_launch_compiles_without_a_stack_frame(tmp_path):
    """knn's first hot sm_8x launch (fp16, k=1: 8 B of stack with the sm_90 tiles on sm_80),
    compiled by the real compiler for sm_80: no stack frame."""
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fastuad.ops.compile_check", "--arch", "80", "--module", "knn_search",
         "--limit", "1", "--jobs", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["arch"] == 80 and row["hot"] and row["error"] is None
    assert row["config"] == "fp16 KP=1 64x64x64 w8 s2" and row["stack_bytes"] == 0
    assert "1 configurations for sm_80" in proc.stdout


def test_under_the_interpreter_it_reruns_itself_without_it(monkeypatch):
    from fastuad.ops import compile_check

    seen = {}

    def fake_run(cmd, env):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 7)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTUAD_COMPILE_CHECK_CHILD", raising=False)
    monkeypatch.setattr(compile_check.subprocess, "run", fake_run)
    assert compile_check.main(["--arch", "90", "--json", "x.json"]) == 7
    assert seen["cmd"][1:] == ["-m", "fastuad.ops.compile_check", "--arch", "90", "--json", "x.json"]
    assert "TRITON_INTERPRET" not in seen["env"]
    # A child that still sees the variable refuses (exit 2) instead of looping.
    monkeypatch.setenv("FASTUAD_COMPILE_CHECK_CHILD", "1")
    assert compile_check.main(["--arch", "90"]) == 2


def test_failures_make_the_exit_status():
    from fastuad.ops.compile_check import _row_problems

    ok = {"error": None, "arch": 90, "shared_bytes": 1024, "stack_bytes": 0, "hot": True}
    assert _row_problems(ok, True) == []
    assert _row_problems({**ok, "shared_bytes": SHARED_LIMITS[90] + 1}, True)
    assert _row_problems({**ok, "arch": 80, "shared_bytes": 200_000}, True)
    assert _row_problems({**ok, "error": "boom"}, True)
    assert _row_problems({**ok, "stack_bytes": 8}, True)
    assert _row_problems({**ok, "stack_bytes": 8}, False) == []
    assert _row_problems({**ok, "stack_bytes": 8, "hot": False}, True) == []


def test_compile_check_rejects_an_unknown_arch():
    from fastuad.ops.compile_check import main

    with pytest.raises(SystemExit) as exc:
        main(["--arch", "75"])
    assert exc.value.code == 2


# ---- one rule for tl.dot precision ---------------------------------------------------------


def test_dot_precision_rule():
    assert dot_precision_for(torch.float32, (9, 0)) == "tf32x3"
    assert dot_precision_for(torch.float32, (8, 0)) == "tf32x3"
    assert dot_precision_for(torch.float32, (7, 5)) == "ieee"
    assert dot_precision_for(torch.float64, (9, 0)) == "ieee"
    assert dot_precision_for(torch.float32, None) == "ieee"
    for dt in (torch.float16, torch.bfloat16):
        for cap in ((7, 0), (8, 0), (9, 0), None):
            assert "tf32" not in dot_precision_for(dt, cap)
    # Off a GPU (or under the interpreter) every dtype gets IEEE products.
    for dt in (torch.float16, torch.float32, torch.float64):
        assert dot_precision(torch.device("cpu"), dt) == "ieee"


# The one place a literal TF32 product is right: memory_read's split product, which runs only when
# dot_precision asked for "tf32x3" and computes the same fp32-accurate product in two TF32 passes
# (the right operand is exact in TF32). Any other literal is a precision chosen outside the rule.
_SPLIT_PRODUCT = ("fastuad.ops.memory", "_dot_exact_b")


def test_no_op_module_passes_a_literal_tf32_precision():
    for module in _op_modules():
        src = inspect.getsource(module)
        if module.__name__ == _SPLIT_PRODUCT[0]:
            helper = inspect.getsource(getattr(module, _SPLIT_PRODUCT[1]).fn)
            assert 'DOT_PRECISION == "tf32x3"' in helper  # only under the rule's 3xTF32
            src = src.replace(helper, "")
        assert not re.search(r"""['"]tf32['"]""", src), f"{module.__name__} picks a tf32 precision outside dot_precision"


def test_gpu_tiles_override_nests():
    before = interpreter_tiles()
    with gpu_tiles():
        assert not interpreter_tiles()
        with gpu_tiles():
            assert not interpreter_tiles()
        assert not interpreter_tiles()
    assert interpreter_tiles() == before


# ---- the shared backend table and the auto failure message ---------------------------------


def test_standard_backends_table():
    table = standard_backends(lambda x: "ref", lambda x: "fused", fused_dtypes=(torch.float32,), check=lambda t, **kw: ["nope"] if kw.get("bad") else [])
    assert set(table) == {"torch", "triton"}
    x = torch.zeros(2, dtype=torch.float16)
    assert table["torch"].not_supported_reasons([x]) == []
    assert any("float32" in r for r in table["triton"].not_supported_reasons([x]))
    assert table["triton"].not_supported_reasons([x.float()], bad=True)[-1] == "nope"


def test_op_tables_are_built_by_the_shared_helper():
    from fastuad.ops.cosdist import COSINE_DISTANCE_BACKENDS
    from fastuad.ops.cosmap import COSINE_DISTANCE_MAP_BACKENDS
    from fastuad.ops.knn_search import KNN_BACKENDS
    from fastuad.ops.local_attn import LOCAL_ATTENTION_BACKENDS
    from fastuad.ops.memory import MEMORY_READ_BACKENDS

    for table in (COSINE_DISTANCE_BACKENDS, COSINE_DISTANCE_MAP_BACKENDS, KNN_BACKENDS, LOCAL_ATTENTION_BACKENDS, MEMORY_READ_BACKENDS):
        assert table["torch"].devices == ("cpu", "cuda")
        assert all(isinstance(b, Backend) for b in table.values())
    assert "cuda" in COSINE_DISTANCE_MAP_BACKENDS


def test_auto_failure_lists_reasons_per_backend_in_lines():
    backends = {
        "torch": Backend("torch", lambda *a: None, devices=("cpu",), dtypes=(torch.float32,)),
        "triton": Backend("triton", lambda *a: None, devices=("cuda",), dtypes=(torch.float32,), check=lambda t, **kw: ["k must be <= 64"]),
    }
    x = torch.zeros(2, dtype=torch.float16)
    with pytest.raises(BackendUnavailableError) as exc:
        select_backend("knn", "auto", backends, [x])
    lines = str(exc.value).splitlines()
    assert lines[0] == "knn: no backend can run these inputs:"
    assert lines[1].startswith("  torch: ") and "float16" in lines[1]
    assert "{" not in str(exc.value)

