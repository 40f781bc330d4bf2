"""Build script: the Python package always, the CUDA extension ``fastuad._C`` only when asked.

The extension is compiled from ``csrc/`` with ``torch.utils.cpp_extension`` (ninja) when a CUDA
toolkit is present and either a GPU is visible or ``FASTUAD_BUILD_CUDA=1`` is set. With no GPU
visible, ``TORCH_CUDA_ARCH_LIST`` defaults to ``9.0`` (Hopper). ``FASTUAD_BUILD_CUDA=0`` skips
the build even where it could run. On a CPU-only machine ``pip install -e .`` therefore finishes
in seconds and the ``cuda`` backend explains how to build it.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup


def _log(msg: str) -> None:
    print(f"fastuad setup: {msg}", file=sys.stderr)


def _pip_cuda_include_dirs() -> list[str]:
    """Headers of the CUDA libraries torch's wheels bring (cuSPARSE, cuBLAS, ...).

    ATen's CUDA headers include them, and a bare toolkit install (nvcc and the runtime only)
    may not have them; the pip ``nvidia-*`` packages that torch depends on do.
    """
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        found += glob.glob(os.path.join(root, "*", "include")) + glob.glob(os.path.join(root, "cu*", "include"))
    return sorted(set(found))


def _cuda_extension_kwargs() -> dict:
    wanted = os.environ.get("FASTUAD_BUILD_CUDA", "").strip().lower()
    if wanted in ("0", "false", "no", "off"):
        _log("FASTUAD_BUILD_CUDA=0: skipping the CUDA extension")
        return {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.isdir("/usr/local/cuda/lib64"):
        # An `nvcc` wrapper on PATH (e.g. /usr/local/bin/nvcc) would make torch guess /usr/local,
        # which has no CUDA libraries; the toolkit's own folder is the right home.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable at build time: skipping the CUDA extension")
        return {}
    forced = wanted in ("1", "true", "yes", "on")
    gpu_visible = torch.cuda.is_available()
    if CUDA_HOME is None:
        if forced:
            raise RuntimeError("FASTUAD_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        _log("no CUDA toolkit found: skipping the CUDA extension")
        return {}
    if not (gpu_visible or forced):
        _log("no GPU visible and FASTUAD_BUILD_CUDA is not 1: skipping the CUDA extension")
        return {}
    if not gpu_visible and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    _log(f"building fastuad._C from {len(sources)} sources for arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'native')}")
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 from 2.14).
    ext = CUDAExtension(
        name="fastuad._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc"), *_pip_cuda_include_dirs()],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_cuda_extension_kwargs())
