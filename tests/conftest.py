"""Test set-up: Triton kernels run on CPU tensors under the interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before triton (and fastuad) are imported, hence here, at the
top of the first conftest pytest loads.
"""

import math
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


@pytest.fixture
def one_thread():
    """One torch thread for the test (model tests: steadier timings on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


RD_SIZE = 64  # the tiny reverse-distillation sets: 64 px, three classes (two textures, an object)
RD_CLASSES = ("brick", "coffee", "grass")


@pytest.fixture(scope="session")
def rd_tiny_root(tmp_path_factory):
    """A tiny demo set in MVTec AD layout shared by the DM-GRD and MDD-Net tests."""
    from fastuad.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("rd_tiny") / "data"
    return make_demo_dataset(root, image_size=RD_SIZE, n_train=4, n_test_good=2, n_test_per_defect=1, classes=RD_CLASSES)


@pytest.fixture(scope="session")
def rd_train_loader(rd_tiny_root):
    """Its training split, unshuffled, in batches of 6."""
    from torch.utils.data import DataLoader

    from fastuad.data import build_dataset

    return DataLoader(build_dataset("mvtec", rd_tiny_root, "train", image_size=RD_SIZE), batch_size=6, shuffle=False)


def hard_mining_easy_mask(dist: torch.Tensor, quantile: float) -> torch.Tensor:
    """Reference for ``CosineDistanceLoss(hard_quantile=...)``: the pixels below the lower
    ``quantile`` of ``dist`` (the ``ceil(quantile * n)``-th smallest value), written out with a sort."""
    flat = dist.detach().flatten().sort().values
    return dist.detach() < flat[math.ceil(quantile * flat.numel()) - 1]
