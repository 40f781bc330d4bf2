"""Export and deployment: ONNX (fp32, fp16, int8), TensorRT engines, one predictor for all formats.

- :func:`to_onnx`: any registered model to ONNX with its metadata (the fused ops lower to
  their PyTorch references during export);
- :func:`quantize_int8`: ONNX Runtime static quantization calibrated on normal images;
- :func:`trt_violations`: the graph checked against TensorRT's pinned ONNX operator table;
- :func:`build_engine`: a TensorRT engine from the ONNX file (where ``tensorrt`` imports);
- :func:`fastuad.deploy.load`: one predictor for ``.pt``, ``.onnx`` and ``.engine`` files.
"""

from fastuad.export.onnx_export import FORMAT_VERSION, ExportError, read_metadata, to_onnx
from fastuad.export.quantize import calibration_images, quantize_int8
from fastuad.export.tensorrt import build_engine, tensorrt_available
from fastuad.export.trt_ops import trt_operator_table, trt_violations

__all__ = [
    "FORMAT_VERSION",
    "ExportError",
    "to_onnx",
    "read_metadata",
    "quantize_int8",
    "calibration_images",
    "build_engine",
    "tensorrt_available",
    "trt_operator_table",
    "trt_violations",
]
