"""What the ahead-of-time compile check compiles: one :class:`CompileTarget` per kernel launch.

Every op module with Triton kernels defines ``compile_targets() -> list[CompileTarget]``, built
from its launchers' own heuristics (the same functions that choose tiles, warps and stages for a
real GPU call), for the DESIGN.md benchmark workloads (``hot=True``) and the shapes the models
use. :mod:`fastuad.ops.compile_check` compiles each one with the real Triton compiler for a GPU
architecture and reports registers, spills and shared memory. Nothing here needs a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CompileTarget", "launch_target"]


@dataclass(frozen=True)
class CompileTarget:
    """One kernel at one launch configuration.

    ``signature`` types every argument of the kernel in Triton's spelling (``"*fp16"``,
    ``"*fp32"``, ``"*i64"``, ``"i32"``, ``"i64"``, ``"fp32"``, ``"constexpr"``); ``constexprs``
    gives the value of each constexpr argument. ``config`` is a short human-readable label
    (dtype, tiles, warps, stages, flags); ``workload`` names the shape it was derived from.
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
    # Argument names whose runtime value is a multiple of 16 (Triton's ``tt.divisibility``
    # specialisation). The compile check assumes it for every pointer argument anyway: torch
    # allocations are 16-byte aligned.
    divisible_by_16: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The kernel's Python function name."""
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))


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
    a scalar as the value the launcher would pass. Integers are typed as the runtime types them:
    ``1`` becomes a constexpr, others ``i32`` (``i64`` from 2**31 on) and multiples of 16 are
    marked divisible; floats are ``fp32``. ``num_stages`` defaults to Triton's default, 3.
    """
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
