"""TensorRT engines from fastuad ONNX files, and running them (TensorRT 8.6-10.x Python API).

TensorRT is not on PyPI in a form our CI can install (its wheels fetch the libraries from
NVIDIA's index), so everything here imports ``tensorrt`` lazily and, where it is missing,
raises :class:`TensorRTUnavailableError` saying what to install. The engine file cannot hold
metadata, so a sidecar ``<engine>.json`` keeps the ONNX file's fastuad metadata and the batch
profile; :mod:`fastuad.export.deploy` reads both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fastuad.export.onnx_export import INPUT_NAME, OUTPUT_NAMES, ExportError, read_metadata

__all__ = ["build_engine", "tensorrt_available", "import_tensorrt", "TensorRTUnavailableError", "TRTRunner", "sidecar_path"]

INSTALL_HINT = (
    "TensorRT's Python package is needed: on a machine with an NVIDIA GPU and driver, "
    "`pip install tensorrt` (NVIDIA's wheels, CUDA 12/13 builds; see "
    "https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html), "
    "or use an NGC container such as nvcr.io/nvidia/tensorrt; the ONNX path "
    "(`--format onnx`) works without it"
)


class TensorRTUnavailableError(ExportError):
    """``tensorrt`` (or a CUDA GPU for it) is not available here: a TensorRT export cannot be made."""


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTUnavailableError` with what to install."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as exc:  # OSError too: a wheel whose libraries are missing
        raise TensorRTUnavailableError(f"tensorrt does not import here ({exc}). {INSTALL_HINT}") from exc
    except OSError as exc:  # pragma: no cover - a broken install
        raise TensorRTUnavailableError(f"tensorrt is installed but its libraries fail to load ({exc}). {INSTALL_HINT}") from exc
    return trt


def tensorrt_available() -> tuple[bool, str]:
    """``(True, version)`` where ``tensorrt`` imports and a CUDA GPU is visible, else ``(False, reason)``."""
    try:
        trt = import_tensorrt()
    except TensorRTUnavailableError as exc:
        return False, str(exc)
    import torch

    if not torch.cuda.is_available():
        return False, "tensorrt imports but no CUDA GPU is visible"
    return True, str(trt.__version__)


def sidecar_path(engine: str | os.PathLike) -> Path:
    return Path(str(engine) + ".json")


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _calibrator(trt, images: np.ndarray, batch: int, cache: Path):
    """An entropy calibrator (TensorRT's implicit INT8) over normal images, in torch CUDA memory."""
    import torch

    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise TensorRTUnavailableError(
            f"TensorRT {trt.__version__} has no IInt8EntropyCalibrator2 (implicit INT8 was removed); "
            "export with `--format onnx --int8` (explicit Q/DQ) and build that file with --fp16 instead"
        )

    class Calibrator(base):
        def __init__(self) -> None:
            base.__init__(self)
            self.images, self.batch, self.pos = images, batch, 0
            self.buffer = torch.empty((batch, *images.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names):  # noqa: ARG002 - one input
            if self.pos + self.batch > len(self.images):
                return None
            self.buffer.copy_(torch.from_numpy(self.images[self.pos : self.pos + self.batch]))
            self.pos += self.batch
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            cache.write_bytes(bytes(data))

    return Calibrator()


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    fp16: bool = False,
    int8: bool = False,
    calibration: np.ndarray | None = None,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_gib: float = 4.0,
    timing_cache: str | os.PathLike | None = None,
) -> Path:
    """Build a TensorRT engine from a fastuad ONNX file; write ``engine_path`` and its sidecar.

    The batch profile is ``min_batch <= opt_batch <= max_batch`` for a dynamic-batch ONNX file
    (default 1/8/32) and the file's fixed batch otherwise. ``int8`` calibrates on
    ``calibration`` (normal training images, ``[N,3,S,S]``, normalised) with an entropy
    calibrator (cache: ``<engine>.calib``). The timing cache (default ``<engine>.timing``) is
    read when present and written back, so rebuilding is fast.
    """
    meta = read_metadata(onnx_path)
    size = meta["image_size"]
    if meta["batch"] == "dynamic":
        opt_batch = opt_batch or min(max(min_batch, 8), max_batch or 32)
        max_batch = max_batch or max(32, opt_batch)
    else:
        fixed = int(meta["batch"])
        for name, value in (("min_batch", min_batch), ("opt_batch", opt_batch), ("max_batch", max_batch)):
            if value is not None and value != fixed and not (name == "min_batch" and value == 1):
                raise ExportError(f"{onnx_path} has a fixed batch of {fixed}; {name}={value} needs an export with --dynamic-batch")
        min_batch = opt_batch = max_batch = fixed
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ExportError(f"the batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    if workspace_gib <= 0:
        raise ExportError(f"workspace must be positive (GiB), got {workspace_gib}")
    if int8 and (calibration is None or len(calibration) < opt_batch):
        raise ExportError(f"int8 needs at least opt_batch={opt_batch} normal calibration images")
    trt = import_tensorrt()
    ok, why = tensorrt_available()
    if not ok:
        raise TensorRTUnavailableError(why)
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    shape = (3, size, size)
    profile.set_shape(INPUT_NAME, (min_batch, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _calibrator(trt, np.ascontiguousarray(calibration, dtype=np.float32), opt_batch, Path(str(engine_path) + ".calib"))
        config.set_calibration_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else Path(str(engine_path) + ".timing")
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    onnx_meta = _raw_props(onnx_path)
    onnx_meta["fastuad.precision"] = "int8" if int8 else ("fp16" if fp16 or meta["precision"] == "fp16" else "fp32")
    side = {"metadata": onnx_meta, "profile": [min_batch, opt_batch, max_batch], "tensorrt": str(trt.__version__), "onnx": str(onnx_path)}
    sidecar_path(engine_path).write_text(json.dumps(side, indent=1), encoding="utf-8")
    return engine_path


def _raw_props(onnx_path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


class TRTRunner:
    """Runs a serialized engine on CUDA torch tensors: ``runner(images) -> (anomaly_map, score)``."""

    def __init__(self, engine_path: str | os.PathLike, profile: Sequence[int], device: str = "cuda") -> None:
        trt = import_tensorrt()
        ok, why = tensorrt_available()
        if not ok:
            raise TensorRTUnavailableError(why)
        import torch

        self.trt, self.device = trt, torch.device(device)
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"{engine_path} is not a TensorRT engine this TensorRT {trt.__version__} can load (rebuild it here)")
        self.context = self.engine.create_execution_context()
        self.profile = tuple(int(b) for b in profile)

    def __call__(self, images):
        import torch

        lo, _, hi = self.profile
        b = int(images.shape[0])
        if not lo <= b <= hi:
            raise ExportError(f"batch {b} is outside the engine's profile: min {lo}, max {hi} (rebuild with --min-batch/--max-batch)")
        x = images.to(self.device, torch.float32).contiguous()
        self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
        amap = torch.empty((b, 1, x.shape[2], x.shape[3]), dtype=torch.float32, device=self.device)
        score = torch.empty((b,), dtype=torch.float32, device=self.device)
        for name, t in ((INPUT_NAME, x), (OUTPUT_NAMES[0], amap), (OUTPUT_NAMES[1], score)):
            self.context.set_tensor_address(name, int(t.data_ptr()))
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT failed to run the engine")
        stream.synchronize()
        return amap, score
