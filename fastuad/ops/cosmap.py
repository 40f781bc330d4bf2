"""Multi-scale cosine-distance anomaly map: the inference hot path of feature-comparison models.

``cosine_distance_map(feats_a, feats_b)`` turns lists of per-scale features ``[B, C_s, H_s, W_s]``
into one map ``[B, 1, H, W]``: per scale ``1 - cos`` over channels, bilinear resize to the output
size (``F.interpolate(..., align_corners=False)``), a ``mean | sum | prod`` over scales and, when
``blur_sigma > 0``, a Gaussian blur equal to ``scipy.ndimage.gaussian_filter(m, blur_sigma,
mode="reflect", truncate=4.0)``.

Fused Triton path, two stages:

1. **Distances at native resolution.** For each scale, :mod:`fastuad.ops.cosdist`'s
   forward kernel reads every feature vector exactly once and writes a small float32 map into
   one flat scratch buffer. This read is nearly all of the op's memory traffic and sets its
   speed limit; nothing ever recomputes a channel dot product per output pixel.
2. **Resize, combine and blur in one pass.** Each program owns a ``TY × TX`` output tile and
   writes it once; no full-size intermediate map ever reaches memory.

   * ``mean`` and ``sum`` are linear, so resize and blur fold into two small matrices per scale,
     ``Lv_s = Gv · Uv_s`` (``[H, H_s]``) and ``Lh_s`` (``[W, W_s]``), built once on the host with
     scipy's ``reflect`` border folded into ``Gv``. A tile is ``Σ_s Lv_s · D_s · Lh_sᵀ``: two
     small matrix products per scale over the band of the small map ``D_s`` that reaches it.
   * ``prod`` is not linear: the program evaluates the combined map by gathers on the tile plus
     a halo of radius ``R`` at reflected coordinates, then blurs it with two banded matrix
     products (``out = Gv · M_ext · Ghᵀ``).

The CUDA C++ backend (``csrc/cosine_map.cu``) implements the same forward with shared memory.
Both fused backends are inference-only; with gradients required, ``"auto"`` takes the reference.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastuad.ops._cuda_ext import _C, cuda_ext_reasons
from fastuad.ops import cosdist
from fastuad.ops._compile import CompileTarget, launch_target
from fastuad.ops._dispatch import HAS_TRITON, Backend, is_exporting, select_backend, standard_backends
from fastuad.ops._launch import cdiv, dot_precision, dot_precision_for, gpu_tiles, interpreter_tiles
from fastuad.ops._validate import check_positive_float, check_same, check_tensor
from fastuad.ops.cosdist import cosine_distance_reference, cosine_distance_triton_forward

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "cosine_distance_map",
    "cosine_distance_map_reference",
    "gaussian_kernel1d",
    "gaussian_weights",
    "gaussian_blur_reference",
    "REDUCTIONS",
    "COSINE_DISTANCE_MAP_BACKENDS",
]

REDUCTIONS = ("mean", "sum", "prod")
TRUNCATE = 4.0
EPS = 1e-8
CUDA_MAX_SCALES = 8
CUDA_MAX_RADIUS = 64


# --------------------------------------------------------------------------------------------
# Gaussian weights and reflect indexing (scipy.ndimage semantics)
# --------------------------------------------------------------------------------------------


def gaussian_radius(sigma: float, truncate: float = TRUNCATE) -> int:
    """scipy's kernel radius: ``int(truncate * sigma + 0.5)``."""
    return int(truncate * float(sigma) + 0.5)


def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """Normalised 1-D Gaussian weights of length ``2R + 1``, float64, exactly as scipy builds them."""
    radius = gaussian_radius(sigma, truncate)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x.astype(np.float64) ** 2)
    return phi / phi.sum()


def reflect_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    """scipy's ``reflect`` (half-sample symmetric) border: ``-1 -> 0``, ``size -> size - 1``; any offset."""
    period = 2 * size
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - 1 - idx, idx)


def _reflect_np(r: int, size: int) -> np.ndarray:
    """:func:`reflect_index` of ``-r .. size + r - 1`` as a NumPy array (a constant when traced)."""
    idx = np.remainder(np.arange(-r, size + r), 2 * size)
    return np.where(idx >= size, 2 * size - 1 - idx, idx).astype(np.int64)


def gaussian_blur_reference(m: torch.Tensor, sigma: float, truncate: float = TRUNCATE) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 1, H, W]`` maps equal to ``scipy.ndimage.gaussian_filter``."""
    g = torch.as_tensor(gaussian_kernel1d(sigma, truncate), dtype=m.dtype, device=m.device)
    r = (g.numel() - 1) // 2
    H, W = m.shape[-2:]
    if is_exporting():  # constant gather indices in the graph (no Range/Mod on traced sizes)
        rows = torch.as_tensor(_reflect_np(r, int(H)), device=m.device)
        cols = torch.as_tensor(_reflect_np(r, int(W)), device=m.device)
    else:
        rows = reflect_index(torch.arange(-r, H + r, device=m.device), H)
        cols = reflect_index(torch.arange(-r, W + r, device=m.device), W)
    padded = m.index_select(-2, rows).index_select(-1, cols)
    out = F.conv2d(padded, g.view(1, 1, -1, 1))
    return F.conv2d(out, g.view(1, 1, 1, -1))


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def cosine_distance_map_reference(
    feats_a: Sequence[torch.Tensor],
    feats_b: Sequence[torch.Tensor],
    out_size: int | tuple[int, int] | None = None,
    reduction: str = "mean",
    blur_sigma: float = 0.0,
) -> torch.Tensor:
    """Plain PyTorch: per-scale ``1 - cos``, ``F.interpolate``, combine, scipy-equal blur."""
    size = _resolve_out_size(out_size, feats_a)
    maps = [
        F.interpolate(cosine_distance_reference(a, b, EPS).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        for a, b in zip(feats_a, feats_b)
    ]
    stacked = torch.stack(maps, 0)
    combined = {"mean": stacked.mean, "sum": stacked.sum, "prod": stacked.prod}[reduction](0)
    if blur_sigma > 0:
        combined = gaussian_blur_reference(combined, blur_sigma)
    return combined


# --------------------------------------------------------------------------------------------
# Triton stage 2: resize + combine + blur per output tile
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _reflect(i, n):
        period = 2 * n
        i = ((i % period) + period) % period
        return tl.where(i >= n, period - 1 - i, i)

    @triton.jit
    def _combined_map(dist_ptr, meta_i_ptr, meta_f_ptr, bi, ys, xs, NUM_SCALES: tl.constexpr, REDUCTION: tl.constexpr):
        """Resized-and-combined distance at integer output coordinates ``ys [R, 1]``, ``xs [1, C]``."""
        if REDUCTION == 2:
            acc = tl.full([ys.shape[0], xs.shape[1]], 1.0, tl.float32)
        else:
            acc = tl.zeros([ys.shape[0], xs.shape[1]], tl.float32)
        for s in tl.static_range(NUM_SCALES):
            off = tl.load(meta_i_ptr + 3 * s).to(tl.int64)
            hs = tl.load(meta_i_ptr + 3 * s + 1)
            ws = tl.load(meta_i_ptr + 3 * s + 2)
            sh = tl.load(meta_f_ptr + 2 * s)
            sw = tl.load(meta_f_ptr + 2 * s + 1)
            # F.interpolate(bilinear, align_corners=False): src = scale * (dst + 0.5) - 0.5, clamped at 0.
            sy = tl.maximum(sh * (ys.to(tl.float32) + 0.5) - 0.5, 0.0)
            sx = tl.maximum(sw * (xs.to(tl.float32) + 0.5) - 0.5, 0.0)
            y0 = sy.to(tl.int32)
            x0 = sx.to(tl.int32)
            y1 = y0 + (y0 < hs - 1).to(tl.int32)
            x1 = x0 + (x0 < ws - 1).to(tl.int32)
            ly1 = sy - y0.to(tl.float32)
            lx1 = sx - x0.to(tl.float32)
            ly0 = 1.0 - ly1
            lx0 = 1.0 - lx1
            base = dist_ptr + off + bi * hs * ws
            v00 = tl.load(base + y0 * ws + x0)
            v01 = tl.load(base + y0 * ws + x1)
            v10 = tl.load(base + y1 * ws + x0)
            v11 = tl.load(base + y1 * ws + x1)
            val = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
            if REDUCTION == 2:
                acc = acc * val
            else:
                acc = acc + val
        if REDUCTION == 0:
            acc = acc / NUM_SCALES
        return acc

    @triton.jit
    def _cosmap_gather_kernel(
        dist_ptr, meta_i_ptr, meta_f_ptr, g_ptr, out_ptr,
        OH, OW, R,
        NUM_SCALES: tl.constexpr,
        REDUCTION: tl.constexpr,
        BLUR: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        TY: tl.constexpr,
        TX: tl.constexpr,
        CH: tl.constexpr,
    ):
        """One ``TY × TX`` output tile of one image: resize, combine, blur, write once.

        The general path (any reduction, ``prod`` included): the combined map is evaluated by
        gathers on the tile plus its halo, then blurred by banded matrix products.
        """
        x_start = tl.program_id(0) * TX
        y_start = tl.program_id(1) * TY
        bi = tl.program_id(2).to(tl.int64)
        oy = tl.arange(0, TY)
        ox = tl.arange(0, TX)
        if BLUR:
            acc = tl.zeros([TY, TX], tl.float32)
            ext = TY + 2 * R
            ext_x = TX + 2 * R
            for rc in range(0, ext, CH):
                rows_rel = rc + tl.arange(0, CH)
                ry = _reflect(y_start - R + rows_rel, OH)
                t = tl.zeros([CH, TX], tl.float32)
                for cc in range(0, ext_x, CH):
                    cols_rel = cc + tl.arange(0, CH)
                    rx = _reflect(x_start - R + cols_rel, OW)
                    m = _combined_map(dist_ptr, meta_i_ptr, meta_f_ptr, bi, ry[:, None], rx[None, :], NUM_SCALES, REDUCTION)
                    # Horizontal band: column j of the window feeds output column o with weight g[j - o].
                    kh = cols_rel[:, None] - ox[None, :]
                    gh = tl.load(g_ptr + kh, mask=(kh >= 0) & (kh <= 2 * R), other=0.0)
                    t = tl.dot(m, gh, t, input_precision=DOT_PRECISION)
                kv = rows_rel[None, :] - oy[:, None]
                gv = tl.load(g_ptr + kv, mask=(kv >= 0) & (kv <= 2 * R), other=0.0)
                acc = tl.dot(gv, t, acc, input_precision=DOT_PRECISION)
        else:
            ys = tl.minimum(y_start + oy, OH - 1)
            xs = tl.minimum(x_start + ox, OW - 1)
            acc = _combined_map(dist_ptr, meta_i_ptr, meta_f_ptr, bi, ys[:, None], xs[None, :], NUM_SCALES, REDUCTION)
        yy = y_start + oy
        xx = x_start + ox
        mask = (yy < OH)[:, None] & (xx < OW)[None, :]
        tl.store(out_ptr + bi * OH * OW + yy[:, None] * OW + xx[None, :], acc, mask=mask)

    @triton.jit
    def _cosmap_linear_kernel(
        dist_ptr, meta_i_ptr, lv_ptr, lh_ptr, band_ptr, out_ptr,
        OH, OW, N_TY, N_TX,
        NUM_SCALES: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        TY: tl.constexpr,
        TX: tl.constexpr,
        KC: tl.constexpr,
    ):
        """One ``TY × TX`` output tile of a linear (mean/sum) map: ``Σ_s Lv_s · D_s · Lh_sᵀ``.

        ``Lv_s = Gv · Uv_s`` folds the vertical blur (reflect border included) into the bilinear
        resize matrix, likewise ``Lh_s``; both are built once on the host. Only the band of
        ``D_s`` that can reach the tile is read (``band_ptr`` holds its row and column range).
        """
        pid_x = tl.program_id(0)
        pid_y = tl.program_id(1)
        bi = tl.program_id(2).to(tl.int64)
        oy = pid_y * TY + tl.arange(0, TY)
        ox = pid_x * TX + tl.arange(0, TX)
        ymask = oy < OH
        xmask = ox < OW
        acc = tl.zeros([TY, TX], tl.float32)
        for s in tl.static_range(NUM_SCALES):
            off = tl.load(meta_i_ptr + 5 * s).to(tl.int64)
            hs = tl.load(meta_i_ptr + 5 * s + 1)
            ws = tl.load(meta_i_ptr + 5 * s + 2)
            lv_off = tl.load(meta_i_ptr + 5 * s + 3)
            lh_off = tl.load(meta_i_ptr + 5 * s + 4)
            k_lo = tl.load(band_ptr + (s * N_TY + pid_y) * 2)
            k_hi = tl.load(band_ptr + (s * N_TY + pid_y) * 2 + 1)
            j_lo = tl.load(band_ptr + NUM_SCALES * N_TY * 2 + (s * N_TX + pid_x) * 2)
            j_hi = tl.load(band_ptr + NUM_SCALES * N_TY * 2 + (s * N_TX + pid_x) * 2 + 1)
            base = dist_ptr + off + bi * hs * ws
            for kc in range(k_lo, k_hi, KC):
                k = kc + tl.arange(0, KC)
                kmask = k < k_hi
                t = tl.zeros([KC, TX], tl.float32)
                for jc in range(j_lo, j_hi, KC):
                    j = jc + tl.arange(0, KC)
                    jmask = j < j_hi
                    d = tl.load(base + k[:, None] * ws + j[None, :], mask=kmask[:, None] & jmask[None, :], other=0.0)
                    lh_t = tl.load(lh_ptr + lh_off + ox[None, :] * ws + j[:, None], mask=jmask[:, None] & xmask[None, :], other=0.0)
                    t = tl.dot(d, lh_t, t, input_precision=DOT_PRECISION)
                lv = tl.load(lv_ptr + lv_off + oy[:, None] * hs + k[None, :], mask=ymask[:, None] & kmask[None, :], other=0.0)
                acc = tl.dot(lv, t, acc, input_precision=DOT_PRECISION)
        tl.store(out_ptr + bi * OH * OW + oy[:, None] * OW + ox[None, :], acc, mask=ymask[:, None] & xmask[None, :])


def _linear_tiles() -> tuple[int, int, int, int]:
    """(TY, TX, KC, num_warps) for the linear second stage.

    64x64 output tiles won the H100 sweep (Triton 3.6, KC=32, 4 warps: 36.6 us). Under Triton
    3.8 that configuration needs 255 registers and an 80-byte stack frame for sm_90 (3xTF32
    keeps three operand copies live); 16-wide K chunks on 8 warps take 176 registers and no
    stack (``python -m fastuad.ops.compile_check --kernel _cosmap_linear``).
    """
    if interpreter_tiles():
        return 32, 32, 32, 4
    return 64, 64, 16, 8


def _stage2_tiles(blur: bool) -> tuple[int, int, int, int]:
    """(TY, TX, CH, num_warps) for the second stage."""
    if interpreter_tiles():
        return 32, 32, 32, 4
    return (64, 64, 32, 8) if blur else (32, 64, 32, 4)


@functools.lru_cache(maxsize=64)
def _scale_meta(shapes: tuple[tuple[int, ...], ...], size: tuple[int, int], device: torch.device):
    """Per-scale ``(offset, H, W)`` into the flat distance buffer and the float32 resize scales.

    Cached per shape set and device: building them is a host-to-device copy, which would
    synchronise the stream on every call.
    """
    meta_i, meta_f, offsets, offset = [], [], [], 0
    for B, _, h, w in shapes:
        meta_i.append((offset, h, w))
        offsets.append(offset)
        # Same rounding as PyTorch: the scale is a float32 quotient in / out.
        meta_f.append((float(np.float32(h) / np.float32(size[0])), float(np.float32(w) / np.float32(size[1]))))
        offset += B * h * w
    mi = torch.tensor(meta_i, dtype=torch.int32, device=device)
    mf = torch.tensor(meta_f, dtype=torch.float32, device=device)
    return mi, mf, tuple(offsets), offset


@functools.lru_cache(maxsize=16)
def gaussian_weights(blur_sigma: float, device: torch.device) -> torch.Tensor:
    """float32 Gaussian weights on ``device``, cached (see :func:`gaussian_kernel1d`)."""
    return torch.as_tensor(gaussian_kernel1d(blur_sigma), dtype=torch.float32, device=device)


def _resize_matrix(out_n: int, in_n: int) -> np.ndarray:
    """``[out_n, in_n]`` matrix of ``F.interpolate(bilinear, align_corners=False)`` along one axis.

    The source coordinates and weights are computed in float32, as PyTorch computes them.
    """
    scale = np.float32(in_n) / np.float32(out_n)
    dst = np.arange(out_n, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < in_n - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float64)
    m = np.zeros((out_n, in_n))
    rows = np.arange(out_n)
    np.add.at(m, (rows, i0), 1.0 - l1)
    np.add.at(m, (rows, i1), l1)
    return m


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``[n, n]`` matrix of the 1-D Gaussian filter with scipy's reflect border folded in."""
    if sigma <= 0:
        return np.eye(n)
    g = gaussian_kernel1d(sigma)
    r = (g.size - 1) // 2
    m = np.zeros((n, n))
    rows = np.repeat(np.arange(n), g.size)
    cols = reflect_index(torch.arange(-r, r + 1).repeat(n) + torch.from_numpy(rows), n).numpy()
    np.add.at(m, (rows, cols), np.tile(g, n))
    return m


def _band(mat: np.ndarray, tile: int) -> np.ndarray:
    """Per tile of ``tile`` rows: the [first, last + 1) range of columns with a non-zero entry."""
    out = []
    for r0 in range(0, mat.shape[0], tile):
        nz = np.flatnonzero(mat[r0 : r0 + tile].any(axis=0))
        out.append((int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0))
    return np.asarray(out, dtype=np.int32)


@functools.lru_cache(maxsize=32)
def _linear_plan(
    shapes: tuple[tuple[int, ...], ...], size: tuple[int, int], sigma: float, mean: bool, ty: int, tx: int, device: torch.device
):
    """Folded resize+blur matrices for every scale, their offsets and band ranges (cached)."""
    blur_v, blur_h = _blur_matrix(size[0], sigma), _blur_matrix(size[1], sigma)
    weight = 1.0 / len(shapes) if mean else 1.0
    lv, lh, meta, bands_v, bands_h = [], [], [], [], []
    offset = lv_off = lh_off = 0
    for B, _, h, w in shapes:
        mv = weight * (blur_v @ _resize_matrix(size[0], h))
        mh = blur_h @ _resize_matrix(size[1], w)
        lv.append(mv.astype(np.float32).ravel())
        lh.append(mh.astype(np.float32).ravel())
        bands_v.append(_band(mv, ty))
        bands_h.append(_band(mh, tx))
        meta.append((offset, h, w, lv_off, lh_off))
        offset += B * h * w
        lv_off += mv.size
        lh_off += mh.size
    band = np.concatenate([np.concatenate(bands_v).ravel(), np.concatenate(bands_h).ravel()])
    return (
        torch.from_numpy(np.concatenate(lv)).to(device),
        torch.from_numpy(np.concatenate(lh)).to(device),
        torch.tensor(meta, dtype=torch.int32, device=device),
        torch.from_numpy(band).to(device),
    )


def cosine_distance_map_triton(
    feats_a: Sequence[torch.Tensor],
    feats_b: Sequence[torch.Tensor],
    size: tuple[int, int],
    reduction: str,
    blur_sigma: float,
    gauss: torch.Tensor | None = None,
) -> torch.Tensor:
    """Two-stage fused forward (see the module docstring). ``gauss`` may be passed pre-built."""
    device = feats_a[0].device
    shapes = tuple(tuple(a.shape) for a in feats_a)
    meta_i, meta_f, offsets, total = _scale_meta(shapes, size, device)
    dist = torch.empty(total, device=device, dtype=torch.float32)
    for off, a, b in zip(offsets, feats_a, feats_b):
        B, _, h, w = a.shape
        cosine_distance_triton_forward(a, b, EPS, out=dist[off : off + B * h * w].view(B, h, w))
    out = torch.empty((B, 1, size[0], size[1]), device=device, dtype=torch.float32)
    if reduction != "prod":
        ty, tx, kc, warps = _linear_tiles()
        lv, lh, meta, band = _linear_plan(shapes, size, float(blur_sigma), reduction == "mean", ty, tx, device)
        n_ty, n_tx = cdiv(size[0], ty), cdiv(size[1], tx)
        _cosmap_linear_kernel[(n_tx, n_ty, B)](
            dist, meta, lv, lh, band, out, size[0], size[1], n_ty, n_tx,
            NUM_SCALES=len(feats_a), DOT_PRECISION=dot_precision(device, dist.dtype), TY=ty, TX=tx, KC=kc, num_warps=warps,
        )
        return out
    blur = blur_sigma > 0
    if blur and gauss is None:
        gauss = gaussian_weights(blur_sigma, device)
    radius = (gauss.numel() - 1) // 2 if blur else 0
    ty, tx, ch, warps = _stage2_tiles(blur)
    grid = (cdiv(size[1], tx), cdiv(size[0], ty), B)
    _cosmap_gather_kernel[grid](
        dist, meta_i, meta_f, gauss if blur else dist, out, size[0], size[1], radius,
        NUM_SCALES=len(feats_a), REDUCTION=REDUCTIONS.index(reduction), BLUR=blur,
        DOT_PRECISION=dot_precision(device, dist.dtype), TY=ty, TX=tx, CH=ch, num_warps=warps,
    )
    return out


def cosine_distance_map_cuda(
    feats_a: Sequence[torch.Tensor],
    feats_b: Sequence[torch.Tensor],
    size: tuple[int, int],
    reduction: str,
    blur_sigma: float,
    gauss: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CUDA C++ forward from ``csrc/cosine_map.cu``."""
    device = feats_a[0].device
    if blur_sigma > 0 and gauss is None:
        gauss = gaussian_weights(blur_sigma, device)
    if blur_sigma <= 0:
        gauss = torch.empty(0, device=device, dtype=torch.float32)
    return _C.cosine_distance_map_forward(
        list(feats_a), list(feats_b), int(size[0]), int(size[1]), REDUCTIONS.index(reduction), gauss, EPS
    )


# --------------------------------------------------------------------------------------------
# Launch configurations for the ahead-of-time compile check (fastuad.ops.compile_check)
# --------------------------------------------------------------------------------------------

# DESIGN.md's cosmap benchmark: B=32, three scales, out 256x256, sigma 4, fp16 and fp32.
COSMAP_WORKLOAD = (32, ((256, 64, 64), (512, 32, 32), (1024, 16, 16)), 256)
# RD4AD's map head on the default EfficientNet-Lite0: sum of three levels, sigma 4, 256 px.
RD4AD_MAP = (cosdist.RD4AD_LEVELS, 256, "sum")
# Stage 2 multiplies float32 operands (distances and folded matrices) whatever the features'
# dtype; every architecture the compile check targets (sm_80+) gets the same precision.
_STAGE2_PRECISION = dot_precision_for(torch.float32, (8, 0))


def _stage2_targets(
    B: int, num_scales: int, size: int, reduction: str, blur: bool, *, workload: str, hot: bool
) -> list[CompileTarget]:
    """The second-stage launch of :func:`cosine_distance_map_triton` for ``reduction``."""
    if reduction != "prod":
        with gpu_tiles():
            ty, tx, kc, warps = _linear_tiles()
        n_ty, n_tx = cdiv(size, ty), cdiv(size, tx)
        args = dict(
            dist_ptr="*fp32", meta_i_ptr="*i32", lv_ptr="*fp32", lh_ptr="*fp32", band_ptr="*i32", out_ptr="*fp32",
            OH=size, OW=size, N_TY=n_ty, N_TX=n_tx,
        )
        return [
            launch_target(
                _cosmap_linear_kernel, args,
                dict(NUM_SCALES=num_scales, DOT_PRECISION=_STAGE2_PRECISION, TY=ty, TX=tx, KC=kc),
                num_warps=warps, config=f"{num_scales} scales {ty}x{tx} KC{kc} {_STAGE2_PRECISION} w{warps}",
                workload=workload, hot=hot,
            )
        ]
    with gpu_tiles():
        ty, tx, ch, warps = _stage2_tiles(blur)
    radius = gaussian_radius(4.0) if blur else 0
    args = dict(
        dist_ptr="*fp32", meta_i_ptr="*i32", meta_f_ptr="*fp32", g_ptr="*fp32", out_ptr="*fp32", OH=size, OW=size, R=radius
    )
    return [
        launch_target(
            _cosmap_gather_kernel, args,
            dict(
                NUM_SCALES=num_scales, REDUCTION=REDUCTIONS.index(reduction), BLUR=blur,
                DOT_PRECISION=_STAGE2_PRECISION, TY=ty, TX=tx, CH=ch,
            ),
            num_warps=warps, config=f"{num_scales} scales prod{' blur' if blur else ''} {ty}x{tx} CH{ch} w{warps}",
            workload=workload, hot=hot,
        )
    ]


def _map_targets(
    B: int, scales, size: int, reduction: str, blur: bool, dtype: torch.dtype, *, workload: str, hot: bool, sms: int
) -> list[CompileTarget]:
    targets = []
    for c, h, w in scales:
        targets += cosdist.forward_targets(B, c, h, w, dtype, with_coef=False, workload=workload, hot=hot, sms=sms)
    return targets + _stage2_targets(B, len(scales), size, reduction, blur, workload=workload, hot=hot)


def compile_targets() -> list[CompileTarget]:
    """Every kernel launch of :func:`cosine_distance_map` (stage 1 is cosdist's forward) for:
    the DESIGN.md cosmap workload (hot: mean, sigma 4, fp16 and fp32, B=32), the same scales for
    one image (the channel-split path) and with ``reduction="prod"`` with and without blur, and
    RD4AD's map head (EfficientNet-Lite0 levels, sum, sigma 4) for B=1, 8 and 32, planned for the
    multiprocessor counts of :data:`fastuad.ops.cosdist.PLANNED_SMS`."""
    batch, scales, size = COSMAP_WORKLOAD
    levels, rd_size, rd_reduction = RD4AD_MAP
    targets: list[CompileTarget] = []
    for sms in cosdist.PLANNED_SMS:
        for dtype in cosdist.TARGET_DTYPES:
            name = str(dtype).replace("torch.", "")
            targets += _map_targets(batch, scales, size, "mean", True, dtype, workload=f"cosmap B{batch} {name}", hot=True, sms=sms)
            targets += _map_targets(1, scales, size, "mean", True, dtype, workload=f"cosmap B1 {name}", hot=False, sms=sms)
            for blur in (True, False):
                wl = f"cosmap B{batch} prod{' blur' if blur else ''} {name}"
                targets += _map_targets(batch, scales, size, "prod", blur, dtype, workload=wl, hot=False, sms=sms)
            for b in (1, 8, 32):
                wl = f"rd4ad map B{b} {name}"
                targets += _map_targets(b, levels, rd_size, rd_reduction, True, dtype, workload=wl, hot=False, sms=sms)
    return targets


# --------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------


def _resolve_out_size(out_size, feats_a: Sequence[torch.Tensor]) -> tuple[int, int]:
    if out_size is None:
        return int(feats_a[0].shape[-2]), int(feats_a[0].shape[-1])
    if isinstance(out_size, bool):
        raise TypeError(f"out_size must be an int or a pair of ints, got {out_size!r}")
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    if (
        not isinstance(out_size, (tuple, list, torch.Size))
        or len(out_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in out_size)
    ):
        raise TypeError(f"out_size must be None, an int or a pair of ints (H, W), got {out_size!r}")
    if out_size[0] <= 0 or out_size[1] <= 0:
        raise ValueError(f"out_size must be positive, got {tuple(out_size)}")
    return int(out_size[0]), int(out_size[1])


def _validate_features(feats_a, feats_b) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    for name, feats in (("feats_a", feats_a), ("feats_b", feats_b)):
        if isinstance(feats, torch.Tensor) or not isinstance(feats, (list, tuple)):
            raise TypeError(f"{name} must be a list of [B, C, H, W] tensors (one per scale), got {type(feats).__name__}")
        if len(feats) == 0:
            raise ValueError(f"{name} must hold at least one scale, got an empty list")
    if len(feats_a) != len(feats_b):
        raise ValueError(f"feats_a and feats_b must have the same number of scales, got {len(feats_a)} and {len(feats_b)}")
    for s, (a, b) in enumerate(zip(feats_a, feats_b)):
        check_tensor(f"feats_a[{s}]", a, 4, "[B, C, H, W]")
        check_tensor(f"feats_b[{s}]", b, 4, "[B, C, H, W]")
        check_same(f"feats_a[{s}]", a, f"feats_b[{s}]", b)
        if a.shape[0] != feats_a[0].shape[0]:
            raise ValueError(f"feats_a[{s}] has batch size {a.shape[0]}, but feats_a[0] has {feats_a[0].shape[0]}")
        if a.dtype != feats_a[0].dtype or a.device != feats_a[0].device:
            raise TypeError(f"feats_a[{s}] must have the dtype and device of feats_a[0] ({feats_a[0].dtype}, {feats_a[0].device})")
        if min(a.shape[1:]) == 0:
            raise ValueError(f"feats_a[{s}] must have non-zero channels and size, got shape {tuple(a.shape)}")
    return list(feats_a), list(feats_b)


def _fused_reasons(tensors: Sequence[torch.Tensor], **_) -> list[str]:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return ["the fused cosine_distance_map kernels are inference-only and the inputs require grad"]
    return []


def _cuda_reasons(tensors: Sequence[torch.Tensor], radius: int = 0, num_scales: int = 1, **kw) -> list[str]:
    reasons = _fused_reasons(tensors)
    if num_scales > CUDA_MAX_SCALES:
        reasons.append(f"the CUDA kernel takes at most {CUDA_MAX_SCALES} scales, got {num_scales}")
    if radius > CUDA_MAX_RADIUS:
        reasons.append(f"the CUDA kernel takes a blur radius of at most {CUDA_MAX_RADIUS}, got {radius}")
    return reasons


def _run_torch(fa, fb, size, reduction, blur_sigma, gauss=None):
    return cosine_distance_map_reference(fa, fb, size, reduction, blur_sigma)


COSINE_DISTANCE_MAP_BACKENDS: dict[str, Backend] = {
    **standard_backends(
        _run_torch, cosine_distance_map_triton, fused_dtypes=(torch.float16, torch.bfloat16, torch.float32), check=_fused_reasons
    ),
    "cuda": Backend(
        "cuda",
        cosine_distance_map_cuda,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        check=_cuda_reasons,
        extra_reasons=cuda_ext_reasons,
    ),
}


def cosine_distance_map(
    feats_a: Sequence[torch.Tensor],
    feats_b: Sequence[torch.Tensor],
    out_size: int | tuple[int, int] | None = None,
    reduction: str = "mean",
    blur_sigma: float = 0.0,
    backend: str = "auto",
    *,
    gaussian: torch.Tensor | None = None,
) -> torch.Tensor:
    """Anomaly map from per-scale feature pairs (see the module docstring for the algorithm).

    Args:
        feats_a, feats_b: lists (one entry per scale) of ``[B, C_s, H_s, W_s]`` tensors; pairs match
            in shape, all share batch size, dtype (float16, bfloat16, float32, float64) and device.
        out_size: output ``(H, W)`` or an int for a square; default: scale 0's size.
        reduction: how scales combine after resizing: ``"mean"``, ``"sum"`` or ``"prod"``.
        blur_sigma: Gaussian sigma in output pixels (``0`` for none), scipy ``reflect`` border,
            ``truncate=4``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        gaussian: optional precomputed float32 weights for ``blur_sigma`` on the features' device
            (:func:`gaussian_weights`); :class:`fastuad.nn.CosineDistanceMap` keeps them as a buffer.

    Returns:
        ``[B, 1, H, W]`` float32 (float64 for float64 inputs on the torch backend).
    """
    fa, fb = _validate_features(feats_a, feats_b)
    size = _resolve_out_size(out_size, fa)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    blur_sigma = check_positive_float("blur_sigma", blur_sigma, allow_zero=True)
    radius = gaussian_radius(blur_sigma) if blur_sigma > 0 else 0
    impl = select_backend(
        "cosine_distance_map", backend, COSINE_DISTANCE_MAP_BACKENDS, fa + fb, radius=radius, num_scales=len(fa)
    )
    if gaussian is not None and (not isinstance(gaussian, torch.Tensor) or gaussian.shape != (2 * radius + 1,)):
        got = tuple(gaussian.shape) if isinstance(gaussian, torch.Tensor) else type(gaussian).__name__
        raise ValueError(f"gaussian must be the {2 * radius + 1} weights of blur_sigma={blur_sigma}, got {got}")
    if gaussian is not None and gaussian.device != fa[0].device:
        gaussian = None  # weights on another device: use the cached copy on the features' device
    if impl.name != "torch" and blur_sigma > 0 and radius == 0:
        blur_sigma = 0.0  # a radius-0 scipy kernel is the identity
    return impl.fn(fa, fb, size, reduction, blur_sigma, gauss=gaussian)

