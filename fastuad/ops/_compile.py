"""What the ahead-of-time compile check compiles: one :class:`CompileTarget` per kernel launch.

Every op module with Triton kernels defines ``compile_targets() -> list[CompileTarget]``, built
from its launchers' own heuristics (the same functions that choose tiles, warps and stages for a
real GPU call), for the DESIGN.md benchmark workloads (``hot=True``) and the shapes the models
use. A module whose launchers pick per architecture defines ``compile_targets(arch: int | None
= None)`` instead (``arch`` = compute capability ``major * 10 + minor``, None = sm_90) and lists
that GPU's launches. :mod:`fastuad.ops.compile_check` compiles each one with the real Triton
compiler for a GPU architecture and reports registers, spills and shared memory. Nothing here
needs a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CompileTarget", "launch_target", "signature"]


@dataclass(frozen=True)
class CompileTarget:
    """One kernel at one launch configuration.

    ``signature`` types every argument of the kernel in Triton's spelling (``"*fp16"``,
    ``"*fp32"``, ``"*i64"``, ``"i32"``, ``"i64"``, ``"fp32"``, ``"constexpr"``); ``constexprs``
    gives the value of each constexpr argument. ``config`` is a short human-readable label
    (dtype, tiles, warps, stages, flags); ``workload`` names the shape it was derived from.
    ``divisible_by_16`` names the arguments a real launch of that workload sees as multiples of
    16 (pointers 16-byte aligned, ints divisible by 16), which Triton's JIT specialises on:
    without them a compile misses the vectorised loads and pipelining the GPU gets, and reports
    far more registers than the launch uses. Pass them to ``ASTSource`` as :meth:`attrs`.
    """

    kernel: Any  # triton JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    config: str
    workload: str
    hot: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    divisible_by_16: tuple[str, ...] = ()

    def attrs(self) -> dict[tuple[int, ...], list]:
        """``ASTSource(..., attrs=)``: ``tt.divisibility = 16`` on the arguments in ``divisible_by_16``."""
        names = list(self.kernel.arg_names)
        return {(names.index(n),): [["tt.divisibility", 16]] for n in self.divisible_by_16}

    @property
    def name(self) -> str:
        """The kernel's Python function name."""
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))


def signature(kernel: Any, types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """A kernel's full ``signature`` for :class:`CompileTarget`, in argument order.

    ``types`` maps the runtime arguments (pointers and scalars) to Triton types; every name in
    ``constexprs`` becomes ``"constexpr"``. A missing or unknown name raises, so a kernel whose
    arguments change cannot silently drift from its compile targets.
    """
    names = list(kernel.arg_names)
    extra = set(types) | set(constexprs)
    unknown = extra - set(names)
    missing = [n for n in names if n not in extra]
    if unknown or missing:
        raise ValueError(f"signature of {getattr(kernel, '__name__', kernel)}: unknown {sorted(unknown)}, missing {missing}")
    return {n: ("constexpr" if n in constexprs else types[n]) for n in names}


def launch_target(
    kernel: Any,
    args: dict[str, Any],
    constexprs: dict[str, Any],
    *,
    num_warps: int,
    num_stages: int = 3,
    config: str,
    workload: str,
    hot: bool = False,
) -> CompileTarget:
    """A :class:`CompileTarget` specialised as Triton's launcher specialises a real call.

    ``args`` gives every non-constexpr argument: a pointer as its Triton type (``"*fp16"``),
    a scalar as the value the launcher would pass. Arguments are typed as Triton's JIT types a
    real call: pointers are marked 16-byte aligned (as torch allocates), the integer ``1``
    becomes a constexpr, other integers ``i32`` (``i64`` from 2**31 on) with multiples of 16
    marked divisible, floats ``fp32``. ``num_stages`` defaults to Triton's default, 3.
    """
    unknown = (set(args) | set(constexprs)) - set(kernel.arg_names)
    if unknown:
        raise KeyError(f"{getattr(kernel, '__name__', kernel)} has no arguments {sorted(unknown)}")
    signature: dict[str, str] = {}
    consts = dict(constexprs)
    divisible = []
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name not in args:
            raise KeyError(f"{getattr(kernel, '__name__', kernel)}: no value for argument {name!r}")
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            if value.startswith("*"):
                divisible.append(name)  # torch allocations are 16-byte aligned
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"argument {name!r}: give a pointer type string, an int or a float, got {value!r}")
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(name)
    return CompileTarget(
        kernel=kernel,
        signature=signature,
        constexprs=consts,
        num_warps=num_warps,
        num_stages=num_stages,
        config=config,
        workload=workload,
        hot=hot,
        divisible_by_16=tuple(divisible),
    )
