// Host entry points of the fastuad CUDA extension (fastuad._C); bound in bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fastuad {

// Fused multi-scale cosine-distance anomaly map (see cosine_map.cu):
//   per scale s: d_s = 1 - cos(feats_a[s], feats_b[s]) over channels, at native resolution;
//   bilinear resize (align_corners=False) of every d_s to [out_h, out_w];
//   combine over scales: reduction 0 = mean, 1 = sum, 2 = prod;
//   optional separable Gaussian blur (scipy "reflect" boundary) with 1-D weights `gauss`
//   (float32, odd length 2R+1; numel 0 = no blur).
// feats_*: CUDA tensors [B, C_s, H_s, W_s], float16 / bfloat16 / float32, 1..8 scales.
// Returns float32 [B, 1, out_h, out_w], contiguous.
at::Tensor cosine_distance_map_forward(const std::vector<at::Tensor>& feats_a,
                                       const std::vector<at::Tensor>& feats_b, int64_t out_h,
                                       int64_t out_w, int64_t reduction, const at::Tensor& gauss,
                                       double eps);

// Stage 1 alone: a, b [B, C, H, W] (same shape and dtype, CUDA) -> float32 [B, H, W] holding
// 1 - dot(a, b) / (max(|a|, eps) * max(|b|, eps)) over C, accumulated in float32.
at::Tensor cosine_distance_forward(const at::Tensor& a, const at::Tensor& b, double eps);

}  // namespace fastuad
