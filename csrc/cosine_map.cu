// Fused multi-scale cosine-distance anomaly map for fastuad._C.
//
// Two kernels, so that every feature element is read from memory exactly once and no
// full-resolution intermediate map is ever written:
//
//   Stage 1 (cosine_distance_kernel): for every scale s and pixel, the cosine distance
//     d_s = 1 - dot(a, b) / (max(|a|, eps) * max(|b|, eps)) over the channels, written at the
//     scale's native (small) resolution into one float32 scratch allocation. All scales go in
//     one launch: each scale owns a contiguous range of blockIdx.x.
//
//   Stage 2 (map_blur_kernel, or map_combine_kernel when there is no blur): each output value
//     M = combine_s(bilinear_resize(d_s)) is evaluated on the fly from the small maps (they
//     sit in L2/L1); no full-size intermediate is written. With a blur, a block owns an output
//     tile of one image (64x64 when the grid still fills the GPU, else 32x32), evaluates M on
//     the tile plus a halo of R at scipy-"reflect" coordinates into shared memory, runs the
//     horizontal then the vertical Gaussian pass in shared memory and writes the tile once.

#include "fastuad_ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <numeric>
#include <vector>

namespace fastuad {
namespace {

constexpr int kMaxScales = 8;

// ---------------------------------------------------------------------------------------------
// Stage 1: per-scale cosine distance at native resolution.
//
// NCHW: for a fixed (b, c) the pixels are contiguous, so threadIdx.x runs along pixels (each
// thread owns VEC consecutive pixels, loaded as one vector of up to 16 bytes: a warp reads one
// contiguous run) and threadIdx.y splits the channel loop into kSlices interleaved slices.
// The three partial sums (dot, |a|^2, |b|^2) of the slices are then reduced through shared
// memory. Splitting channels across warps keeps the block count high for small maps with
// many channels (e.g. B=32, C=1024, 16x16).
// ---------------------------------------------------------------------------------------------
constexpr int kLanes = 32;   // blockDim.x: pixel lanes (one warp wide)
constexpr int kSlices = 8;   // blockDim.y: channel slices
constexpr int kStage1Threads = kLanes * kSlices;

template <typename scalar_t>
struct CosScale {
  const scalar_t* a;    // [B, C, HW] contiguous
  const scalar_t* b;    // [B, C, HW] contiguous
  float* out;           // [B, HW] distances
  int64_t C;
  int64_t HW;
  int64_t npix;         // B * HW
  int64_t block_begin;  // first blockIdx.x of this scale
  int vec;              // pixels per thread (1, 2, 4, 8): one vector load of vec elements
};

template <typename scalar_t>
struct CosParams {
  CosScale<scalar_t> scale[kMaxScales];  // ordered by increasing block_begin
  int num_scales;
  float eps;
};

// Fixed-size vector of VEC elements, loaded with one (up to 16-byte) memory instruction.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) VecT {
  scalar_t val[VEC];
};

// One block's work for one scale with VEC pixels per thread. `red` is the block's shared
// buffer [3][kSlices][red_stride] floats, red_stride >= kLanes * VEC.
template <typename scalar_t, int VEC>
__device__ __forceinline__ void cosine_block(const CosScale<scalar_t>& sc, float eps, float* red,
                                             int red_stride) {
  using vec_t = VecT<scalar_t, VEC>;
  // Channels unrolled per iteration: all 2*U loads are issued before the first use. Narrow
  // vectors get a deeper unroll so each thread keeps >= 32 bytes per tensor in flight.
  constexpr int kVecBytes = VEC * static_cast<int>(sizeof(scalar_t));
  constexpr int U = kVecBytes >= 8 ? 4 : 32 / kVecBytes;

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t block_pix0 = (static_cast<int64_t>(blockIdx.x) - sc.block_begin) * (kLanes * VEC);
  const int64_t q0 = block_pix0 + static_cast<int64_t>(tx) * VEC;  // this thread's first pixel

  float dot[VEC], na[VEC], nb[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    dot[v] = 0.f;
    na[v] = 0.f;
    nb[v] = 0.f;
  }

  // The host picks VEC only where HW % VEC == 0 (and the pointers are aligned), so a thread's
  // VEC pixels are either all valid and in the same image, or all past the end.
  if (q0 < sc.npix) {
    const int64_t img = q0 / sc.HW;
    const int64_t pix = q0 - img * sc.HW;
    const int64_t base = (img * sc.C + ty) * sc.HW + pix;  // element (img, c = ty, pix)
    const scalar_t* pa = sc.a + base;
    const scalar_t* pb = sc.b + base;
    const int64_t cstride = static_cast<int64_t>(kSlices) * sc.HW;  // to this thread's next channel

    int64_t c = ty;
    for (; c + static_cast<int64_t>(U - 1) * kSlices < sc.C; c += static_cast<int64_t>(U) * kSlices) {
      vec_t va[U], vb[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        va[u] = *reinterpret_cast<const vec_t*>(pa + u * cstride);
        vb[u] = *reinterpret_cast<const vec_t*>(pb + u * cstride);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float x = static_cast<float>(va[u].val[v]);
          const float y = static_cast<float>(vb[u].val[v]);
          dot[v] = fmaf(x, y, dot[v]);
          na[v] = fmaf(x, x, na[v]);
          nb[v] = fmaf(y, y, nb[v]);
        }
      }
      pa += U * cstride;
      pb += U * cstride;
    }
    for (; c < sc.C; c += kSlices) {  // remainder channels
      const vec_t va = *reinterpret_cast<const vec_t*>(pa);
      const vec_t vb = *reinterpret_cast<const vec_t*>(pb);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float x = static_cast<float>(va.val[v]);
        const float y = static_cast<float>(vb.val[v]);
        dot[v] = fmaf(x, y, dot[v]);
        na[v] = fmaf(x, x, na[v]);
        nb[v] = fmaf(y, y, nb[v]);
      }
      pa += cstride;
      pb += cstride;
    }
  }

  // Partial sums to shared memory at [k][ty][v * kLanes + tx] (a warp's stores hit 32
  // consecutive words: no bank conflicts).
  float* red_dot = red;
  float* red_na = red + kSlices * red_stride;
  float* red_nb = red + 2 * kSlices * red_stride;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const int i = ty * red_stride + v * kLanes + tx;
    red_dot[i] = dot[v];
    red_na[i] = na[v];
    red_nb[i] = nb[v];
  }
  __syncthreads();

  // Thread t < kLanes * VEC finishes column t = v * kLanes + lane, i.e. pixel lane * VEC + v
  // of the block (consecutive threads read consecutive words).
  const int t = ty * kLanes + tx;
  if (t < kLanes * VEC) {
    const int v = t / kLanes;
    const int lane = t - v * kLanes;
    const int64_t q = block_pix0 + static_cast<int64_t>(lane) * VEC + v;
    if (q < sc.npix) {
      float sdot = 0.f, sna = 0.f, snb = 0.f;
#pragma unroll
      for (int y = 0; y < kSlices; ++y) {
        sdot += red_dot[y * red_stride + t];
        sna += red_na[y * red_stride + t];
        snb += red_nb[y * red_stride + t];
      }
      const float denom = fmaxf(sqrtf(sna), eps) * fmaxf(sqrtf(snb), eps);
      sc.out[q] = 1.f - sdot / denom;
    }
  }
}

// Grid: 1-D, the blocks of every scale back to back; block (kLanes, kSlices).
template <typename scalar_t>
__global__ void __launch_bounds__(kStage1Threads)
    cosine_distance_kernel(const CosParams<scalar_t> p) {
  constexpr int kMaxVec = 16 / static_cast<int>(sizeof(scalar_t));
  constexpr int kRedStride = kLanes * kMaxVec;
  __shared__ float red[3 * kSlices * kRedStride];

  // Find this block's scale (compile-time indices only, so the parameter struct is read in
  // place rather than copied to local memory). The choice is uniform across the block.
  CosScale<scalar_t> sc = p.scale[0];
#pragma unroll
  for (int i = 1; i < kMaxScales; ++i) {
    if (i < p.num_scales && static_cast<int64_t>(blockIdx.x) >= p.scale[i].block_begin) {
      sc = p.scale[i];
    }
  }

  switch (sc.vec) {
    case 8:
      if constexpr (kMaxVec >= 8) cosine_block<scalar_t, 8>(sc, p.eps, red, kRedStride);
      break;
    case 4:
      if constexpr (kMaxVec >= 4) cosine_block<scalar_t, 4>(sc, p.eps, red, kRedStride);
      break;
    case 2:
      if constexpr (kMaxVec >= 2) cosine_block<scalar_t, 2>(sc, p.eps, red, kRedStride);
      break;
    default:
      cosine_block<scalar_t, 1>(sc, p.eps, red, kRedStride);
      break;
  }
}

// Pixels per thread for one scale: the widest vector (<= 16 bytes) that divides HW and
// matches both pointers' alignment, narrowed while the scale would launch fewer than
// `min_blocks` blocks (small maps: more, thinner blocks keep more SMs busy).
int pick_vec(int64_t npix, int64_t HW, const void* pa, const void* pb, int elem_size,
             int64_t min_blocks) {
  int vec = 16 / elem_size;
  auto ok = [&](int v) {
    const auto bytes = static_cast<uintptr_t>(v) * static_cast<uintptr_t>(elem_size);
    return HW % v == 0 && reinterpret_cast<uintptr_t>(pa) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(pb) % bytes == 0;
  };
  while (vec > 1 && !ok(vec)) vec /= 2;
  while (vec > 1 && (npix + kLanes * vec - 1) / (kLanes * vec) < min_blocks) vec /= 2;
  return vec;
}

// Launches stage 1 for all scales in one kernel. a[s], b[s]: contiguous [B, C, H, W] of one
// dtype on the current device; out[s]: float32 buffers of B*H*W elements.
void launch_cosine_stage1(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                          const std::vector<float*>& out, float eps, cudaStream_t stream) {
  const int S = static_cast<int>(a.size());
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t min_blocks = 2 * static_cast<int64_t>(num_sms);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(),
                                  "fastuad_cosine_distance", [&] {
    const int elem = static_cast<int>(sizeof(scalar_t));
    std::vector<CosScale<scalar_t>> scales;
    std::vector<int64_t> work;  // elements read per block: heaviest blocks are launched first
    for (int s = 0; s < S; ++s) {
      CosScale<scalar_t> sc{};
      sc.a = a[s].data_ptr<scalar_t>();
      sc.b = b[s].data_ptr<scalar_t>();
      sc.out = out[s];
      sc.C = a[s].size(1);
      sc.HW = a[s].size(2) * a[s].size(3);
      sc.npix = a[s].size(0) * sc.HW;
      sc.vec = pick_vec(sc.npix, sc.HW, sc.a, sc.b, elem, min_blocks);
      if (sc.npix == 0) continue;  // nothing to compute for this scale
      scales.push_back(sc);
      work.push_back(sc.C * sc.vec);
    }
    if (scales.empty()) return;

    // Long-running blocks (many channels per pixel) first, so the short ones fill the tail.
    std::vector<int> order(scales.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int i, int j) { return work[i] > work[j]; });

    CosParams<scalar_t> params{};
    params.num_scales = static_cast<int>(scales.size());
    params.eps = eps;
    int64_t total_blocks = 0;
    for (size_t k = 0; k < order.size(); ++k) {
      CosScale<scalar_t> sc = scales[order[k]];
      sc.block_begin = total_blocks;
      total_blocks += (sc.npix + kLanes * sc.vec - 1) / (kLanes * sc.vec);
      params.scale[k] = sc;
    }
    TORCH_CHECK(total_blocks <= INT_MAX,
                "cosine_distance_map (CUDA): the feature maps are too large for one launch (",
                total_blocks, " blocks)");
    const dim3 block(kLanes, kSlices);
    cosine_distance_kernel<scalar_t>
        <<<static_cast<unsigned int>(total_blocks), block, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// Stage 2: resize + combine (+ blur) straight from the small maps.
//
// One block per TW x TH output tile of one image (grid: tiles_x, tiles_y, B; block
// (kLanes, kS2Rows)). M is evaluated on the tile plus a halo of R (R = 0 without blur) at
// scipy-"reflect" coordinates. Bilinear resize is separable, so the block first tabulates, per
// scale, the source rows/weights of each of its ext_h rows and the source columns/weights of
// each of its ext_w columns (reflection, index clamping and weights computed once per
// row/column, not per pixel); a value of M then costs 4 L1/L2 loads and a few FMAs per scale.
// ---------------------------------------------------------------------------------------------
constexpr int kReduceMean = 0;
constexpr int kReduceSum = 1;
constexpr int kReduceProd = 2;
static_assert(kReduceMean < kReduceSum && kReduceSum < kReduceProd, "reduction codes");

constexpr int kS2Rows = 8;  // blockDim.y of stage 2 (blockDim.x = kLanes)
constexpr int kStage2Threads = kLanes * kS2Rows;

struct MapScale {
  const float* d;  // [B, H, W] distances of stage 1
  int H;
  int W;
  float scale_h;  // (float)H / (float)out_h, as F.interpolate(align_corners=False)
  float scale_w;
};

struct MapParams {
  MapScale scale[kMaxScales];  // in the caller's scale order (combine order)
  int num_scales;
  int reduction;
  int out_h;
  int out_w;
};

// One tabulated row or column: source indices (rows: premultiplied by W) and weights.
struct alignas(16) AxisTap {
  int i0;
  int i1;
  float l0;
  float l1;
};

// scipy.ndimage "reflect" (half-sample symmetric, period 2n): -1 -> 0, -2 -> 1, n -> n-1.
// The modulo form stays valid when the blur radius exceeds the map size.
__device__ __forceinline__ int reflect_index(int i, int n) {
  const int period = 2 * n;
  i %= period;
  if (i < 0) i += period;
  if (i >= n) i = period - 1 - i;
  return i;
}

// Source index and weights along one axis, exactly as PyTorch's upsample_bilinear2d
// (align_corners=False): src = scale * (dst + 0.5) - 0.5 clamped at 0.
__device__ __forceinline__ AxisTap bilinear_tap(float scale, int dst, int in_size, int mult) {
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  src = src < 0.f ? 0.f : src;
  const int i0 = static_cast<int>(src);
  const int i1 = i0 + ((i0 < in_size - 1) ? 1 : 0);
  AxisTap t;
  t.l1 = src - static_cast<float>(i0);
  t.l0 = 1.f - t.l1;
  t.i0 = i0 * mult;
  t.i1 = i1 * mult;
  return t;
}

// Evaluates M on the ext_h x ext_w region whose top-left corner is output pixel
// (oy0 - R, ox0 - R) of image b, reflected into the image, and calls store(ry, rx, value).
template <int TW, int TH, typename Store>
__device__ __forceinline__ void eval_region(const MapParams& p, int b, int oy0, int ox0, int R,
                                            AxisTap* rows, AxisTap* cols, Store store) {
  const int ext_h = TH + 2 * R;
  const int ext_w = TW + 2 * R;
  const int tid = threadIdx.y * kLanes + threadIdx.x;

  // Tables: rows[s * ext_h + ry], cols[s * ext_w + rx].
#pragma unroll
  for (int s = 0; s < kMaxScales; ++s) {
    if (s < p.num_scales) {
      const MapScale& sc = p.scale[s];
      for (int r = tid; r < ext_h; r += kStage2Threads) {
        rows[s * ext_h + r] = bilinear_tap(sc.scale_h, reflect_index(oy0 - R + r, p.out_h), sc.H, sc.W);
      }
      for (int c = tid; c < ext_w; c += kStage2Threads) {
        cols[s * ext_w + c] = bilinear_tap(sc.scale_w, reflect_index(ox0 - R + c, p.out_w), sc.W, 1);
      }
    }
  }
  __syncthreads();

  // Each scale's map of image b (loop invariant, kept in registers).
  const float* dimg[kMaxScales];
#pragma unroll
  for (int s = 0; s < kMaxScales; ++s) {
    dimg[s] = s < p.num_scales
                  ? p.scale[s].d + static_cast<int64_t>(b) * p.scale[s].H * p.scale[s].W
                  : nullptr;
  }

  const bool prod = p.reduction == kReduceProd;
  for (int ry = threadIdx.y; ry < ext_h; ry += kS2Rows) {
    for (int rx = threadIdx.x; rx < ext_w; rx += kLanes) {
      float acc = prod ? 1.f : 0.f;
#pragma unroll
      for (int s = 0; s < kMaxScales; ++s) {
        if (s < p.num_scales) {
          const float* d = dimg[s];
          const AxisTap ty = rows[s * ext_h + ry];
          const AxisTap tx = cols[s * ext_w + rx];
          // 32-bit offsets within the image (H * W <= INT_MAX is checked on the host).
          const float v00 = __ldg(d + (ty.i0 + tx.i0));
          const float v01 = __ldg(d + (ty.i0 + tx.i1));
          const float v10 = __ldg(d + (ty.i1 + tx.i0));
          const float v11 = __ldg(d + (ty.i1 + tx.i1));
          const float v = ty.l0 * (tx.l0 * v00 + tx.l1 * v01) + ty.l1 * (tx.l0 * v10 + tx.l1 * v11);
          acc = prod ? acc * v : acc + v;
        }
      }
      // Mean as sum / S (division, like the reference's mean up to rounding).
      if (p.reduction == kReduceMean) acc = acc / static_cast<float>(p.num_scales);
      store(ry, rx, acc);
    }
  }
}

// No blur: M written straight to the output tile (coalesced along x).
template <int TW, int TH>
__global__ void __launch_bounds__(kStage2Threads)
    map_combine_kernel(const MapParams p, float* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  AxisTap* rows = reinterpret_cast<AxisTap*>(smem_raw);
  AxisTap* cols = rows + p.num_scales * TH;
  const int b = blockIdx.z;
  const int oy0 = blockIdx.y * TH;
  const int ox0 = blockIdx.x * TW;
  float* out_img = out + static_cast<int64_t>(b) * p.out_h * p.out_w;
  eval_region<TW, TH>(p, b, oy0, ox0, 0, rows, cols, [&](int ry, int rx, float v) {
    const int y = oy0 + ry;
    const int x = ox0 + rx;
    if (y < p.out_h && x < p.out_w) out_img[static_cast<int64_t>(y) * p.out_w + x] = v;
  });
}

// Blur. Dynamic shared memory after the tables, in floats:
//   sM [ext_h][ext_w]  M on the tile and its halo (positions of partial tiles past the image
//                      edge are computed too but never written out)
//   sH [ext_h][TW]     horizontal pass
//   sG [taps rounded up to 4]  Gaussian weights, zero padded (the compiler reads sG with
//                      16-byte loads, which may cover up to 3 words past the last tap)
// Both passes are register-blocked: a thread computes several rows of one column, so each
// weight read from shared memory serves several FMAs (the passes are shared-memory bound).
constexpr int kHRowsPerThread = 4;  // horizontal pass: rows r, r + 8, r + 16, r + 24

__host__ __device__ constexpr int padded_taps(int R) { return (2 * R + 1 + 3) & ~3; }

template <int TW, int TH>
__global__ void __launch_bounds__(kStage2Threads)
    map_blur_kernel(const MapParams p, const float* __restrict__ gauss, int R,
                    float* __restrict__ out) {
  static_assert(TW % kLanes == 0 && TH % kS2Rows == 0, "tile must be a multiple of the block");
  constexpr int kVRowsPerThread = TH / kS2Rows;  // vertical pass: rows ty, ty + 8, ...
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ext_h = TH + 2 * R;
  const int ext_w = TW + 2 * R;
  const int taps = 2 * R + 1;
  AxisTap* rows = reinterpret_cast<AxisTap*>(smem_raw);
  AxisTap* cols = rows + p.num_scales * ext_h;
  float* sM = reinterpret_cast<float*>(cols + p.num_scales * ext_w);
  float* sH = sM + ext_h * ext_w;
  float* sG = sH + ext_h * TW;

  const int b = blockIdx.z;
  const int oy0 = blockIdx.y * TH;  // tile origin in the output image
  const int ox0 = blockIdx.x * TW;
  const int tid = threadIdx.y * kLanes + threadIdx.x;

  for (int i = tid; i < padded_taps(R); i += kStage2Threads) sG[i] = i < taps ? gauss[i] : 0.f;
  eval_region<TW, TH>(p, b, oy0, ox0, R, rows, cols,
                      [&](int ry, int rx, float v) { sM[ry * ext_w + rx] = v; });
  __syncthreads();

  // Horizontal pass: sH[r][c] = sum_k g[k] * sM[r][c + k] (a warp reads consecutive words).
  for (int r0 = threadIdx.y; r0 < ext_h; r0 += kS2Rows * kHRowsPerThread) {
    for (int c = threadIdx.x; c < TW; c += kLanes) {
      const float* src[kHRowsPerThread];
      float acc[kHRowsPerThread];
#pragma unroll
      for (int i = 0; i < kHRowsPerThread; ++i) {
        const int r = min(r0 + i * kS2Rows, ext_h - 1);  // rows past the end: read, not stored
        src[i] = sM + r * ext_w + c;
        acc[i] = 0.f;
      }
      for (int k = 0; k < taps; ++k) {
        const float g = sG[k];
#pragma unroll
        for (int i = 0; i < kHRowsPerThread; ++i) acc[i] = fmaf(g, src[i][k], acc[i]);
      }
#pragma unroll
      for (int i = 0; i < kHRowsPerThread; ++i) {
        const int r = r0 + i * kS2Rows;
        if (r < ext_h) sH[r * TW + c] = acc[i];
      }
    }
  }
  __syncthreads();

  // Vertical pass and the only global write: out[y][x] = sum_j g[j] * sH[r + j][c].
  float* out_img = out + static_cast<int64_t>(b) * p.out_h * p.out_w;
  for (int c = threadIdx.x; c < TW; c += kLanes) {
    const float* src = sH + threadIdx.y * TW + c;
    float acc[kVRowsPerThread];
#pragma unroll
    for (int i = 0; i < kVRowsPerThread; ++i) acc[i] = 0.f;
    for (int j = 0; j < taps; ++j) {
      const float g = sG[j];
#pragma unroll
      for (int i = 0; i < kVRowsPerThread; ++i) {
        acc[i] = fmaf(g, src[(i * kS2Rows + j) * TW], acc[i]);
      }
    }
    const int x = ox0 + c;
#pragma unroll
    for (int i = 0; i < kVRowsPerThread; ++i) {
      const int y = oy0 + threadIdx.y + i * kS2Rows;
      if (y < p.out_h && x < p.out_w) out_img[static_cast<int64_t>(y) * p.out_w + x] = acc[i];
    }
  }
}

// Dynamic shared memory of one stage-2 block, in bytes.
int64_t stage2_smem_bytes(int TW, int TH, int num_scales, int R, bool blur) {
  const int64_t ext_h = TH + 2 * static_cast<int64_t>(R);
  const int64_t ext_w = TW + 2 * static_cast<int64_t>(R);
  int64_t bytes = num_scales * (ext_h + ext_w) * static_cast<int64_t>(sizeof(AxisTap));
  if (blur) {
    bytes += (ext_h * ext_w + ext_h * TW + padded_taps(R)) * static_cast<int64_t>(sizeof(float));
  }
  return bytes;
}

template <int TW, int TH>
void launch_stage2(const MapParams& params, int64_t B, const float* gauss, int R, bool blur,
                   int64_t smem_bytes, float* out, cudaStream_t stream) {
  const int64_t tiles_x = (params.out_w + TW - 1) / TW;
  const int64_t tiles_y = (params.out_h + TH - 1) / TH;
  TORCH_CHECK(tiles_y <= 65535, "cosine_distance_map_forward: out_h too large for the CUDA backend (",
              params.out_h, ")");
  const dim3 grid(static_cast<unsigned int>(tiles_x), static_cast<unsigned int>(tiles_y),
                  static_cast<unsigned int>(B));
  const dim3 block(kLanes, kS2Rows);
  if (blur) {
    if (smem_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(map_blur_kernel<TW, TH>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem_bytes)));
    }
    map_blur_kernel<TW, TH><<<grid, block, static_cast<size_t>(smem_bytes), stream>>>(
        params, gauss, R, out);
  } else {
    map_combine_kernel<TW, TH><<<grid, block, static_cast<size_t>(smem_bytes), stream>>>(params,
                                                                                        out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Host-side checks.
// ---------------------------------------------------------------------------------------------
bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_feature_pair(const at::Tensor& a, const at::Tensor& b, const char* what, int64_t s,
                        const at::Tensor& ref) {
  TORCH_CHECK(a.defined() && b.defined(), what, ": feature tensors of scale ", s,
              " must be defined");
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), what, ": feature tensors must be CUDA tensors, got ",
              a.device(), " and ", b.device(), " at scale ", s);
  TORCH_CHECK(a.device() == ref.device() && b.device() == ref.device(), what,
              ": all feature tensors must be on one device (", ref.device(), "), got ",
              a.device(), " and ", b.device(), " at scale ", s);
  TORCH_CHECK(supported_dtype(a.scalar_type()), what,
              ": feature dtype must be float16, bfloat16 or float32, got ", a.scalar_type(),
              " at scale ", s);
  TORCH_CHECK(a.scalar_type() == ref.scalar_type() && b.scalar_type() == ref.scalar_type(), what,
              ": all feature tensors must have one dtype (", ref.scalar_type(), "), got ",
              a.scalar_type(), " and ", b.scalar_type(), " at scale ", s);
  TORCH_CHECK(a.dim() == 4, what, ": feature tensors must be 4-D [B, C, H, W], got ", a.dim(),
              "-D at scale ", s);
  TORCH_CHECK(a.sizes() == b.sizes(), what, ": feats_a and feats_b must have equal shapes, got ",
              a.sizes(), " and ", b.sizes(), " at scale ", s);
  TORCH_CHECK(a.size(0) == ref.size(0), what, ": all scales must have one batch size (",
              ref.size(0), "), got ", a.size(0), " at scale ", s);
  TORCH_CHECK(a.size(2) > 0 && a.size(3) > 0, what, ": spatial size must be positive, got ",
              a.sizes(), " at scale ", s);
  TORCH_CHECK(a.size(2) <= INT_MAX && a.size(3) <= INT_MAX &&
                  a.size(2) * a.size(3) <= INT_MAX,
              what, ": spatial size too large at scale ", s);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------------
at::Tensor cosine_distance_map_forward(const std::vector<at::Tensor>& feats_a,
                                       const std::vector<at::Tensor>& feats_b, int64_t out_h,
                                       int64_t out_w, int64_t reduction, const at::Tensor& gauss,
                                       double eps) {
  constexpr const char* kWhat = "cosine_distance_map_forward";
  const int64_t S = static_cast<int64_t>(feats_a.size());
  TORCH_CHECK(S >= 1 && S <= kMaxScales, kWhat, ": expected 1 to ", kMaxScales,
              " feature scales, got ", S);
  TORCH_CHECK(feats_b.size() == feats_a.size(), kWhat,
              ": feats_a and feats_b must have the same number of scales, got ", feats_a.size(),
              " and ", feats_b.size());
  TORCH_CHECK(feats_a[0].defined(), kWhat, ": feature tensors of scale 0 must be defined");
  for (int64_t s = 0; s < S; ++s) check_feature_pair(feats_a[s], feats_b[s], kWhat, s, feats_a[0]);
  TORCH_CHECK(out_h >= 1 && out_w >= 1, kWhat, ": out_h and out_w must be positive, got ", out_h,
              " and ", out_w);
  TORCH_CHECK(out_h <= INT_MAX && out_w <= INT_MAX && out_h * out_w <= INT_MAX, kWhat,
              ": output size too large (", out_h, " x ", out_w, ")");
  TORCH_CHECK(reduction >= kReduceMean && reduction <= kReduceProd, kWhat,
              ": reduction must be 0 (mean), 1 (sum) or 2 (prod), got ", reduction);

  const at::Device device = feats_a[0].device();
  const int64_t B = feats_a[0].size(0);

  const bool blur = gauss.defined() && gauss.numel() > 0;
  int R = 0;
  if (blur) {
    TORCH_CHECK(gauss.is_cuda() && gauss.device() == device, kWhat,
                ": gauss must be on the features' device (", device, "), got ", gauss.device());
    TORCH_CHECK(gauss.scalar_type() == at::kFloat, kWhat, ": gauss must be float32, got ",
                gauss.scalar_type());
    TORCH_CHECK(gauss.dim() == 1, kWhat, ": gauss must be 1-D, got ", gauss.dim(), "-D");
    TORCH_CHECK(gauss.numel() % 2 == 1, kWhat, ": gauss must have odd length 2R+1, got ",
                gauss.numel());
    TORCH_CHECK(gauss.numel() <= 65535, kWhat, ": gauss is too long (", gauss.numel(), ")");
    R = static_cast<int>((gauss.numel() - 1) / 2);
  }

  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor out = at::empty({B, 1, out_h, out_w}, feats_a[0].options().dtype(at::kFloat));
  if (B == 0) return out;
  TORCH_CHECK(B <= 65535, kWhat, ": batch size too large for the CUDA backend (", B,
              " > 65535)");

  // Stage 1 into one float32 scratch allocation holding every scale's [B, H_s, W_s] map.
  std::vector<at::Tensor> a(S), b(S);
  std::vector<int64_t> offsets(S);
  int64_t scratch_elems = 0;
  for (int64_t s = 0; s < S; ++s) {
    a[s] = feats_a[s].contiguous();
    b[s] = feats_b[s].contiguous();
    offsets[s] = scratch_elems;
    scratch_elems += B * a[s].size(2) * a[s].size(3);
  }
  at::Tensor scratch = at::empty({scratch_elems}, out.options());
  float* scratch_ptr = scratch.data_ptr<float>();
  std::vector<float*> maps(S);
  for (int64_t s = 0; s < S; ++s) maps[s] = scratch_ptr + offsets[s];
  launch_cosine_stage1(a, b, maps, static_cast<float>(eps), stream);

  // Stage 2.
  MapParams params{};
  params.num_scales = static_cast<int>(S);
  params.reduction = static_cast<int>(reduction);
  params.out_h = static_cast<int>(out_h);
  params.out_w = static_cast<int>(out_w);
  for (int64_t s = 0; s < S; ++s) {
    MapScale& ms = params.scale[s];
    ms.d = maps[s];
    ms.H = static_cast<int>(a[s].size(2));
    ms.W = static_cast<int>(a[s].size(3));
    ms.scale_h = static_cast<float>(ms.H) / static_cast<float>(out_h);
    ms.scale_w = static_cast<float>(ms.W) / static_cast<float>(out_w);
  }
  float* out_ptr = out.data_ptr<float>();

  const int smem_limit = static_cast<int>(
      at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (!blur) {
    const int64_t smem_bytes = stage2_smem_bytes(32, 32, params.num_scales, 0, false);
    launch_stage2<32, 32>(params, B, nullptr, 0, false, smem_bytes, out_ptr, stream);
    return out;
  }

  // Blur: a 64x64 tile recomputes a smaller share of halo than a 32x32 one (for R = 16:
  // 2.25x instead of 4x the tile's values of M); use it where it fits in shared memory and the
  // grid still has a block per SM, else 32x32.
  const at::Tensor g = gauss.contiguous();
  const int64_t smem64 = stage2_smem_bytes(64, 64, params.num_scales, R, true);
  const int64_t smem32 = stage2_smem_bytes(32, 32, params.num_scales, R, true);
  const int64_t blocks64 = ((out_h + 63) / 64) * ((out_w + 63) / 64) * B;
  const bool big_tile = smem64 <= smem_limit && blocks64 >= num_sms;
  if (big_tile) {
    launch_stage2<64, 64>(params, B, g.data_ptr<float>(), R, true, smem64, out_ptr, stream);
  } else {
    TORCH_CHECK(smem32 <= smem_limit, kWhat,
                ": blur radius R too large for the CUDA backend (R=", R, " needs ", smem32,
                " bytes of shared memory per block, the device allows ", smem_limit,
                "); use the torch backend or a smaller sigma");
    launch_stage2<32, 32>(params, B, g.data_ptr<float>(), R, true, smem32, out_ptr, stream);
  }
  return out;
}

at::Tensor cosine_distance_forward(const at::Tensor& a, const at::Tensor& b, double eps) {
  constexpr const char* kWhat = "cosine_distance_forward";
  TORCH_CHECK(a.defined(), kWhat, ": a must be defined");
  check_feature_pair(a, b, kWhat, 0, a);

  c10::cuda::CUDAGuard guard(a.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor out = at::empty({a.size(0), a.size(2), a.size(3)}, a.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  launch_cosine_stage1({a.contiguous()}, {b.contiguous()}, {out.data_ptr<float>()},
                       static_cast<float>(eps), stream);
  return out;
}

}  // namespace fastuad
