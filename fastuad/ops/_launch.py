"""Host-side helpers for launching Triton kernels, shared by every op module.

Kept in plain Python: ``triton.cdiv`` and friends are JIT functions and cost microseconds per
call from the host, which adds up on the ~100 µs ops this library is about.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from fastuad.ops._dispatch import HAS_TRITON, TRITON_INTERPRET

if HAS_TRITON:
    import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


_FORCE_GPU_TILES = False
_FORCE_ARCH: int | None = None


def interpreter_tiles() -> bool:
    """Whether launchers pick the interpreter's small tiles: under ``TRITON_INTERPRET``, unless
    :func:`gpu_tiles` forces the GPU configuration."""
    return TRITON_INTERPRET and not _FORCE_GPU_TILES


@contextlib.contextmanager
def gpu_tiles(arch: int | None = None) -> Iterator[None]:
    """Inside the block, launchers choose their GPU launch configuration (tiles, warps, stages)
    even under the interpreter: tests use it to check the numbers of the code path a GPU runs.

    ``arch`` (compute capability as ``major * 10 + minor``, e.g. 80) makes :func:`launch_arch`
    answer it, so the launchers pick that architecture's configuration; ``None`` keeps the
    enclosing choice (a CUDA tensor's own device, sm_90's tiles off a GPU).
    """
    global _FORCE_GPU_TILES, _FORCE_ARCH
    saved = _FORCE_GPU_TILES, _FORCE_ARCH
    _FORCE_GPU_TILES = True
    if arch is not None:
        _FORCE_ARCH = arch
    try:
        yield
    finally:
        _FORCE_GPU_TILES, _FORCE_ARCH = saved


def launch_arch(device: torch.device) -> int | None:
    """The architecture a launcher picks tiles for, as ``major * 10 + minor`` (80 for an A100).

    The ``arch`` of an active :func:`gpu_tiles` block; else a CUDA device's compute capability;
    else None, which every tile heuristic reads as sm_90 (the GPU the tiles were first chosen for).
    """
    if _FORCE_ARCH is not None:
        return _FORCE_ARCH
    if device.type != "cuda":
        return None
    major, minor = _capability(device)
    return 10 * major + minor


def sm8x_tiles(arch: int | None) -> bool:
    """Whether ``arch`` gets the sm_8x launch tiles: a known architecture below sm_90 (A100's
    sm_80, sm_86, sm_89). sm_90 and newer, and None, keep the sm_90 tiles."""
    return arch is not None and arch < 90


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; a plausible GPU size (132) under the interpreter."""
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=8)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def acc_dtype(dtype: torch.dtype):
    """Triton accumulator type: float64 for float64 inputs (gradchecks), else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision_for(dtype: torch.dtype, capability: tuple[int, int] | None) -> str:
    """The ``input_precision`` of every ``tl.dot`` in fastuad, from the operand dtype and the GPU.

    One rule for every op:

    * float64 operands, or no CUDA GPU (``capability`` None: the interpreter computes in fp32
      whatever is asked): ``"ieee"``;
    * float32 operands on sm_80+ (TF32 tensor cores): ``"tf32x3"``, fp32-accurate products
      (error ~2e-6 on the cosmap stage 2) 1.5x faster than IEEE in the H100 sweep; below sm_80
      ``"ieee"``;
    * float16 / bfloat16 operands: ``"ieee"``. Triton ignores the setting for 16-bit operands,
      but a kernel that upcasts its 16-bit inputs before a dot must not silently get plain TF32
      (10-bit mantissa) products, so 16-bit inputs never get a tf32 argument.
    """
    if capability is None or dtype != torch.float32:
        return "ieee"
    return "tf32x3" if capability >= (8, 0) else "ieee"


def gpu_dot_precision(dtype: torch.dtype, arch: int | None = None) -> str:
    """:func:`dot_precision_for` ``dtype`` operands on a GPU of ``arch`` (``major * 10 + minor``;
    None stands for sm_90): what a launch there gets, for the ops' ``compile_targets``."""
    return dot_precision_for(dtype, (9, 0) if arch is None else divmod(arch, 10))


def dot_precision(device: torch.device, dtype: torch.dtype) -> str:
    """:func:`dot_precision_for` the operands' ``dtype`` on ``device`` (``"ieee"`` off a GPU)."""
    if TRITON_INTERPRET or device.type != "cuda":
        return "ieee"
    return dot_precision_for(dtype, _capability(device))
