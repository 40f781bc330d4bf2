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


def _cuda_extension_kwargs() -> dict:
    wanted = os.environ.get("FASTUAD_BUILD_CUDA", "").strip().lower()
    if wanted in ("0", "false", "no", "off"):
        _log("FASTUAD_BUILD_CUDA=0: skipping the CUDA extension")
        return {}
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
    ext = CUDAExtension(
        name="fastuad._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_cuda_extension_kwargs())
