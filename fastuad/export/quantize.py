"""INT8 through ONNX Runtime static quantization, calibrated on normal images only.

Users have no defects to calibrate on, and the detector must not learn the range of defect
features anyway, so the calibration set is the normal training images (``train/good`` of each
class). Only the heavy layers are quantized (Conv, ConvTranspose, Gemm): the anomaly map's own
arithmetic (``1 - cos``, resizing, the blur, memory and k-NN distances) stays in float32, since
int8 steps would swamp the small feature differences the map is made of. The Q/DQ pairs are
symmetric (zero point 0), which TensorRT's parser also requires, so the int8 file passes
:func:`fastuad.export.trt_violations` too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from fastuad.export.onnx_export import INPUT_NAME, ExportError, read_metadata, save_model, set_metadata

__all__ = ["quantize_int8", "calibration_images", "QUANTIZED_OPS"]

QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm")


def calibration_images(data_root: str | os.PathLike, image_size: int, limit: int = 64, dataset: str = "mvtec",
                       classes: Sequence[str] | None = None, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` normal training images of ``data_root`` (all classes, evenly), normalised, ``[N,3,S,S]``."""
    from fastuad.data import build_dataset

    train = build_dataset(dataset, str(data_root), split="train", classes=classes, image_size=image_size)
    n = len(train)
    if n == 0:
        raise ExportError(f"no normal training images under {data_root} to calibrate on")
    pick = np.linspace(0, n - 1, num=min(limit, n)).round().astype(int)  # spread over the classes
    return np.stack([train[int(i)]["image"].numpy() for i in pick]).astype(np.float32)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over an array, in batches the graph accepts."""

    def __init__(self, images: np.ndarray, batch: int | str) -> None:
        step = 1 if batch == "dynamic" else int(batch)
        usable = len(images) - len(images) % step
        if usable == 0:
            raise ExportError(f"need at least {step} calibration images for a batch-{step} graph, got {len(images)}")
        self._batches: Iterable = iter(images[i : i + step] for i in range(0, usable, step))

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, images: np.ndarray, method: str = "minmax") -> Path:
    """Write an int8 (QDQ) copy of the fp32 fastuad ONNX file ``src`` at ``dst``.

    ``images``: normal images ``[N,3,S,S]``, normalised as the metadata says (see
    :func:`calibration_images`). ``method``: ``"minmax"``, ``"percentile"`` or ``"entropy"``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    meta = read_metadata(src)
    if meta["precision"] != "fp32":
        raise ExportError(f"quantize_int8 starts from an fp32 export; {src} is {meta['precision']}")
    size = meta["image_size"]
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != (3, size, size):
        raise ExportError(f"calibration images must be [N, 3, {size}, {size}], got {list(images.shape)}")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ExportError(f"method must be one of {', '.join(methods)}, got {method!r}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp.onnx")
    try:
        quantize_static(
            str(src),
            str(tmp),
            _Reader(images, meta["batch"]),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
        )
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".data").unlink(missing_ok=True)
    src_proto = onnx.load(str(src), load_external_data=False)
    props = {p.key: p.value for p in src_proto.metadata_props}
    props["fastuad.precision"] = "int8"
    set_metadata(proto, props)
    save_model(proto, dst)
    return dst
