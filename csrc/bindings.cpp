// Python bindings of the fastuad CUDA extension: the module fastuad._C.
#include <torch/extension.h>

#include "fastuad_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastuad CUDA kernels (fused cosine-distance anomaly maps)";

  m.def("cosine_distance_map_forward", &fastuad::cosine_distance_map_forward,
        "Fused multi-scale cosine-distance map: per-scale 1 - cosine similarity over channels, "
        "bilinear resize (align_corners=False) to (out_h, out_w), mean/sum/prod over scales "
        "(reduction 0/1/2) and an optional separable Gaussian blur (scipy reflect mode; empty "
        "gauss = no blur). Returns float32 [B, 1, out_h, out_w].",
        py::arg("feats_a"), py::arg("feats_b"), py::arg("out_h"), py::arg("out_w"),
        py::arg("reduction"), py::arg("gauss"), py::arg("eps"));

  m.def("cosine_distance_forward", &fastuad::cosine_distance_forward,
        "1 - cosine similarity over dim 1 of two [B, C, H, W] CUDA tensors, accumulated in "
        "float32. Returns float32 [B, H, W].",
        py::arg("a"), py::arg("b"), py::arg("eps"));
}
