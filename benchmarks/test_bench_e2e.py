"""The ``e2e`` workload of DESIGN.md: whole-model inference, images per second, per registered model.

Backends, in this order for every model (baselines first, for the speedup columns):

* ``eager``: the model with every fused op forced onto its pure-PyTorch reference
  (``with fastuad.ops.force_backend("torch")``);
* ``compile``: ``torch.compile(model)`` under the same forced references;
* ``fused``: the model as shipped (``backend="auto"``: Triton/CUDA kernels on a GPU);
* ``onnxruntime``: the model's ONNX export (:func:`fastuad.export.to_onnx`, dynamic batch) in
  ONNX Runtime, CUDA provider on a GPU when the installed onnxruntime has it (inputs and
  outputs bound to CUDA memory), else the CPU provider;
* ``tensorrt``: a TensorRT fp16 engine built from that export, where ``tensorrt`` imports.

Every backend's anomaly maps and scores are first checked against ``eager`` (fp32:
``1e-4 x max|ref|`` for the PyTorch paths, ``1e-3 x max|ref|`` for ONNX Runtime whose kernels sum
in another order; TensorRT fp16: ``2e-2 x max|ref|``), then timed. Records carry
``images_per_s``.

Sizes (``FASTUAD_BENCH_SIZE``): ``full`` (the default on CUDA) B=32 at 256 px as DESIGN.md says;
``cpu`` (the default otherwise) B=2 at 128 px, at most 2 timed rounds; ``tiny`` B=1 at 64 px.
On a CPU two columns are skipped with their reason: ``fused`` (``auto`` picks the same torch
references as ``eager`` on CPU tensors) and ``compile`` (inductor needs minutes per model on a
2-core CPU; ``FASTUAD_E2E_COMPILE=1`` includes it). The whole CPU run stays within a few
minutes for all models.
"""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

import fastuad
from fastuad.models import create_model, list_models

BACKENDS = ("eager", "compile", "fused", "onnxruntime", "tensorrt")
SIZES = {"full": (32, 256), "cpu": (2, 128), "tiny": (1, 64)}
CPU_MAX_ROUNDS = 2
TOL = {"eager": 1e-4, "compile": 1e-4, "fused": 1e-4, "onnxruntime": 1e-3, "tensorrt": 2e-2}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _device() -> torch.device:
    name = os.environ.get("FASTUAD_BENCH_DEVICE", "").strip()
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


DEVICE = _device()


def _size() -> str:
    if _truthy("FASTUAD_BENCH_TINY"):
        return "tiny"
    size = os.environ.get("FASTUAD_BENCH_SIZE", "").strip().lower() or ("full" if DEVICE.type == "cuda" else "cpu")
    if size not in SIZES:
        raise ValueError(f"FASTUAD_BENCH_SIZE must be one of {', '.join(SIZES)}, got {size!r}")
    return size


BATCH, IMAGE = SIZES[_size()]
_TMP = Path(tempfile.mkdtemp(prefix="fastuad-e2e-"))


def _fill_memory(model: torch.nn.Module) -> None:
    """Models with banks or memories fill them from a few random 'normal' images first."""
    if not hasattr(model, "fit_memory"):
        return
    g = torch.Generator().manual_seed(3)
    samples = [
        {"image": torch.randn(3, IMAGE, IMAGE, generator=g), "mask": torch.zeros(1, IMAGE, IMAGE), "label": 0,
         "class_index": i % 2, "class_name": "ab"[i % 2], "path": str(i)}
        for i in range(4)
    ]
    with torch.no_grad():
        model.fit_memory(torch.utils.data.DataLoader(samples, batch_size=2), 0, False)


@lru_cache(maxsize=1)
def _setup(name: str):
    """(model, images, reference map, reference score) for ``name``; one model held at a time."""
    torch.manual_seed(0)
    model = create_model(name, weights="random", image_size=IMAGE).to(DEVICE).eval()
    _fill_memory(model)
    model.eval()
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad(), fastuad.ops.force_backend("torch"):
        ref_map, ref_score = model(x)
    return model, x, ref_map.float(), ref_score.float()


@lru_cache(maxsize=1)
def _onnx(name: str) -> Path:
    from fastuad.export import to_onnx

    model = _setup(name)[0]
    return to_onnx(model, _TMP / f"{name}.onnx", dynamic_batch=True)


def _ort_runner(path: Path, x: torch.Tensor):
    import onnxruntime as ort

    from fastuad.export.deploy import onnx_providers

    providers = onnx_providers(x.device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same CPU threads as PyTorch
    sess = ort.InferenceSession(str(path), options, providers=providers)
    if providers[0] != "CUDAExecutionProvider":
        xn = x.cpu().numpy()

        def run():
            amap, score = sess.run(None, {"images": xn})
            return torch.from_numpy(amap), torch.from_numpy(score)

        return run, providers[0]
    amap = torch.empty((x.shape[0], 1, x.shape[2], x.shape[3]), device=x.device)
    score = torch.empty((x.shape[0],), device=x.device)
    binding = sess.io_binding()
    idx = x.device.index or 0
    binding.bind_input("images", "cuda", idx, np.float32, list(x.shape), x.data_ptr())
    binding.bind_output("anomaly_map", "cuda", idx, np.float32, list(amap.shape), amap.data_ptr())
    binding.bind_output("score", "cuda", idx, np.float32, list(score.shape), score.data_ptr())

    def run_cuda():
        sess.run_with_iobinding(binding)
        return amap, score

    return run_cuda, providers[0]


def _runner(backend: str, name: str, harness):
    """``(fn, extra)`` for one backend, or a skip with its reason."""
    model, x, _, _ = _setup(name)
    if backend == "eager":

        def eager():
            with torch.no_grad(), fastuad.ops.force_backend("torch"):
                return model(x)

        return eager, {}
    if backend == "compile":
        if DEVICE.type == "cpu" and not _truthy("FASTUAD_E2E_COMPILE"):
            harness.skip("torch.compile of a whole model takes minutes per model on a 2-core CPU (FASTUAD_E2E_COMPILE=1 runs it)")
        compiled = harness.compile(model)

        def comp():
            with torch.no_grad(), fastuad.ops.force_backend("torch"):
                return compiled(x)

        return comp, {}
    if backend == "fused":
        if DEVICE.type == "cpu":
            harness.skip("on CPU tensors backend='auto' runs the same torch references as eager")

        def fused():
            with torch.no_grad():
                return model(x)

        return fused, {}
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            harness.skip("onnxruntime is not installed (pip install onnxruntime or onnxruntime-gpu)")
        fn, provider = _ort_runner(_onnx(name), x)
        return fn, {"provider": provider}
    # tensorrt
    from fastuad.export.tensorrt import TRTRunner, build_engine, tensorrt_available

    ok, why = tensorrt_available()
    if not ok or DEVICE.type != "cuda":
        harness.skip(f"TensorRT: {why if not ok else 'needs a CUDA device'}")
    engine = build_engine(_onnx(name), _TMP / f"{name}.engine", fp16=True, min_batch=1, opt_batch=BATCH, max_batch=BATCH)
    runner = TRTRunner(engine, (1, BATCH, BATCH), str(DEVICE))
    return (lambda: runner(x)), {"precision": "fp16"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list_models())
def test_e2e(fastuad_bench, name: str, backend: str):
    harness = fastuad_bench
    harness.describe(workload="e2e", case=f"{name} B={BATCH} {IMAGE}px", backend=backend, dtype=torch.float32, device=DEVICE,
                     model=name, batch=BATCH, image_size=IMAGE)
    fn, extra = _runner(backend, name, harness)
    _, _, ref_map, ref_score = _setup(name)
    amap, score = harness.first_call(fn, compiled=backend == "compile")
    amap, score = harness.first_call(fn, compiled=backend == "compile")  # a second call: warm paths (graphs, autotune)
    harness.assert_close("anomaly_map", amap.float().to(ref_map.device), ref_map, TOL[backend], scale=True)
    harness.assert_close("score", score.float().to(ref_score.device), ref_score, TOL[backend], scale=True)
    harness.measure(fn, device=DEVICE, extra={**extra}, max_rounds=CPU_MAX_ROUNDS if DEVICE.type == "cpu" else None)
    stats = harness.benchmark.stats
    if stats is not None:
        rate = BATCH / float(stats.stats.median)
        harness.store.records[-1]["images_per_s"] = rate
        harness.benchmark.extra_info["images_per_s"] = rate
