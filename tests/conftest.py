"""Test set-up: Triton kernels run on CPU tensors under the interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before triton (and fastuad) are imported, hence here, at the
top of the first conftest pytest loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastuad  # noqa: E402,F401  (imports triton after the variable is set)
from fastuad.ops._dispatch import TRITON_INTERPRET  # noqa: E402

# Where the Triton kernels run: the GPU when there is one, else CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_device() -> str:
    return TRITON_DEVICE


def float_dtypes_for_triton() -> list[torch.dtype]:
    """fp32 and fp16 everywhere; bf16 only on a GPU (the interpreter has none)."""
    dtypes = [torch.float32, torch.float16]
    if not TRITON_INTERPRET:
        dtypes.append(torch.bfloat16)
    return dtypes


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
