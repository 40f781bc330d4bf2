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

__all__ = ["CompileTarget"]


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

    @property
    def name(self) -> str:
        """The kernel's Python function name."""
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))
