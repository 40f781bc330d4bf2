"""``fastuad.deploy.load(path, device)``: one predictor for ``.pt``, ``.onnx`` and ``.engine`` files.

See :mod:`fastuad.export.deploy`.
"""

from fastuad.export.deploy import FORMATS, DeployError, OnnxPredictor, Predictor, TensorRTPredictor, TorchPredictor, load

__all__ = ["load", "Predictor", "TorchPredictor", "OnnxPredictor", "TensorRTPredictor", "DeployError", "FORMATS"]
