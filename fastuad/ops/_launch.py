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


def interpreter_tiles() -> bool:
    """Whether launchers pick the interpreter's small tiles: under ``TRITON_INTERPRET``, unless
    :func:`gpu_tiles` forces the GPU configuration."""
    return TRITON_INTERPRET and not _FORCE_GPU_TILES


@contextlib.contextmanager
def gpu_tiles() -> Iterator[None]:
    """Inside the block, launchers choose their GPU launch configuration (tiles, warps, stages)
    even under the interpreter: tests use it to check the numbers of the code path a GPU runs."""
    global _FORCE_GPU_TILES
    saved, _FORCE_GPU_TILES = _FORCE_GPU_TILES, True
    try:
        yield
    finally:
        _FORCE_GPU_TILES = saved


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


def dot_precision(device: torch.device) -> str:
    """fp32-accurate ``tl.dot`` products on fp32 operands.

    3xTF32 (tensor cores, error ~2e-6 on the cosmap stage 2) where the GPU has TF32 (sm_80+):
    1.5x faster than IEEE fp32 products in the H100 sweep. The interpreter computes in fp32
    whatever is asked.
    """
    if TRITON_INTERPRET or device.type != "cuda":
        return "ieee"
    return "tf32x3" if _capability(device) >= (8, 0) else "ieee"
