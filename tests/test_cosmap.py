"""cosine_distance_map: reference against scipy/torch definitions, fused backends against it."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from conftest import TRITON_DEVICE, float_dtypes_for_triton, requires_cuda
from fastuad.ops import (
    BackendUnavailableError,
    cosine_distance_map,
    cosine_distance_map_reference,
    gaussian_blur_reference,
    gaussian_kernel1d,
)
from fastuad.ops.cosmap import COSINE_DISTANCE_MAP_BACKENDS, reflect_index

# Three scales at strides 1, 2, 4 of an 16x16 grid, channel counts off the block sizes.
SCALES = [(8, 16, 16), (20, 8, 8), (33, 4, 4)]


def _features(scales, batch=2, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    fa, fb = [], []
    for c, h, w in scales:
        a = torch.randn(batch, c, h, w, generator=g)
        b = 0.7 * a + 0.5 * torch.randn(batch, c, h, w, generator=g)
        fa.append(a.to(device=device, dtype=dtype))
        fb.append(b.to(device=device, dtype=dtype))
    return fa, fb


# ---- the reference is what DESIGN.md says it is -------------------------------------------


def test_gaussian_kernel_is_scipys():
    for sigma in (0.5, 1.0, 4.0, 7.3):
        impulse = np.zeros(201)
        impulse[100] = 1.0
        r = int(4.0 * sigma + 0.5)
        np.testing.assert_allclose(gaussian_kernel1d(sigma), ndi.gaussian_filter1d(impulse, sigma)[100 - r : 101 + r], atol=1e-15)


def test_reflect_index_is_half_sample_symmetric():
    idx = reflect_index(torch.arange(-7, 12), 4)
    assert idx.tolist() == [1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3]


@pytest.mark.parametrize("sigma, hw", [(4.0, (40, 37)), (1.5, (9, 12)), (6.0, (5, 7))])
def test_blur_reference_equals_scipy(sigma, hw):
    m = torch.rand(2, 1, *hw, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = np.stack([ndi.gaussian_filter(m[i, 0].numpy(), sigma, mode="reflect", truncate=4.0) for i in range(2)])
    np.testing.assert_allclose(gaussian_blur_reference(m, sigma)[:, 0].numpy(), expected, atol=1e-12)


def test_reference_matches_definition_step_by_step():
    fa, fb = _features(SCALES, dtype=torch.float64)
    size = (30, 26)
    maps = [
        F.interpolate((1 - F.cosine_similarity(a, b, dim=1)).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        for a, b in zip(fa, fb)
    ]
    prod = maps[0] * maps[1] * maps[2]
    expected = np.stack([ndi.gaussian_filter(prod[i, 0].numpy(), 3.0, mode="reflect") for i in range(2)])[:, None]
    got = cosine_distance_map(fa, fb, out_size=size, reduction="prod", blur_sigma=3.0, backend="torch")
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


# ---- fused Triton path against the reference ----------------------------------------------

CASES = [
    # (scales, out_size, reduction, sigma)
    (SCALES, None, "mean", 0.0),
    (SCALES, None, "sum", 4.0),
    (SCALES, (40, 37), "prod", 4.0),
    (SCALES, 20, "mean", 2.0),
    (SCALES, (10, 12), "sum", 9.0),  # radius 36 > size: several reflections
    ([(8, 16, 16)], (7, 5), "mean", 1.0),  # one scale, downsampled
    ([(5, 3, 4), (6, 7, 9)], (70, 45), "mean", 0.0),  # scales not in stride order, no blur
    ([(3, 1, 1), (4, 2, 3)], (33, 65), "sum", 0.4),  # 1x1 scale; radius 2
    ([(130, 4, 4), (8, 8, 8)], 16, "prod", 1.0),  # enough channels for the split channel loop
]


@pytest.mark.parametrize("scales, out_size, reduction, sigma", CASES)
def test_triton_matches_reference(scales, out_size, reduction, sigma):
    fa, fb = _features(scales, device=TRITON_DEVICE)
    got = cosine_distance_map(fa, fb, out_size=out_size, reduction=reduction, blur_sigma=sigma, backend="triton")
    want = cosine_distance_map_reference(fa, fb, out_size=out_size, reduction=reduction, blur_sigma=sigma)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", float_dtypes_for_triton())
def test_triton_low_precision_inputs_give_float32(dtype):
    fa, fb = _features(SCALES, dtype=dtype, device=TRITON_DEVICE, seed=5)
    got = cosine_distance_map(fa, fb, out_size=24, reduction="sum", blur_sigma=2.0, backend="triton")
    want = cosine_distance_map_reference(fa, fb, out_size=24, reduction="sum", blur_sigma=2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_triton_non_contiguous_inputs():
    fa, fb = _features(SCALES, device=TRITON_DEVICE, seed=6)
    fa = [a.contiguous(memory_format=torch.channels_last) for a in fa]
    fb = [b.transpose(2, 3).contiguous().transpose(2, 3) for b in fb]
    got = cosine_distance_map(fa, fb, out_size=(20, 18), blur_sigma=1.0, backend="triton")
    torch.testing.assert_close(got, cosine_distance_map_reference(fa, fb, (20, 18), "mean", 1.0), atol=2e-5, rtol=1e-5)


def test_triton_partial_edge_tiles_are_right():
    """Outputs that are not multiples of the tile size: the last row and column tiles are partial."""
    fa, fb = _features([(4, 5, 5)], batch=1, device=TRITON_DEVICE, seed=7)
    for sigma in (0.0, 1.0):
        got = cosine_distance_map(fa, fb, out_size=(67, 35), blur_sigma=sigma, backend="triton")
        want = cosine_distance_map_reference(fa, fb, (67, 35), "mean", sigma)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_auto_uses_reference_when_grad_is_required():
    fa, fb = _features(SCALES, device=TRITON_DEVICE)
    fa = [a.requires_grad_() for a in fa]
    reasons = COSINE_DISTANCE_MAP_BACKENDS["triton"].not_supported_reasons(fa + fb)
    assert any("inference-only" in r for r in reasons)
    out = cosine_distance_map(fa, fb, blur_sigma=1.0)
    out.sum().backward()
    assert fa[0].grad is not None and torch.isfinite(fa[0].grad).all()
    with pytest.raises(BackendUnavailableError, match="inference-only"):
        cosine_distance_map(fa, fb, backend="triton")


def test_precomputed_gaussian_is_used_and_checked():
    fa, fb = _features(SCALES, device=TRITON_DEVICE)
    g = torch.tensor(gaussian_kernel1d(2.0), dtype=torch.float32, device=TRITON_DEVICE)
    got = cosine_distance_map(fa, fb, blur_sigma=2.0, backend="triton", gaussian=g)
    torch.testing.assert_close(got, cosine_distance_map_reference(fa, fb, None, "mean", 2.0), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gaussian must be the 17 weights"):
        cosine_distance_map(fa, fb, blur_sigma=2.0, gaussian=g[:5])


# ---- CUDA C++ backend ----------------------------------------------------------------------


def test_cuda_backend_explains_how_to_build_when_missing():
    from fastuad.ops._cuda_ext import _C

    if _C is not None:
        pytest.skip("the CUDA extension is built here")
    fa, fb = _features(SCALES)
    with pytest.raises(BackendUnavailableError, match="FASTUAD_BUILD_CUDA=1"):
        cosine_distance_map(fa, fb, backend="cuda")


@requires_cuda
@pytest.mark.parametrize("scales, out_size, reduction, sigma", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(scales, out_size, reduction, sigma, dtype):
    from fastuad.ops._cuda_ext import _C

    if _C is None:
        pytest.skip("the CUDA extension fastuad._C is not built")
    fa, fb = _features(scales, dtype=dtype, device="cuda")
    got = cosine_distance_map(fa, fb, out_size=out_size, reduction=reduction, blur_sigma=sigma, backend="cuda")
    want = cosine_distance_map_reference(fa, fb, out_size=out_size, reduction=reduction, blur_sigma=sigma)
    tol = 2e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@requires_cuda
def test_auto_picks_a_fused_backend_on_cuda():
    fa, fb = _features(SCALES, device="cuda")
    from fastuad.ops._dispatch import select_backend

    impl = select_backend("cosine_distance_map", "auto", COSINE_DISTANCE_MAP_BACKENDS, fa + fb, radius=16, num_scales=3)
    assert impl.name in ("cuda", "triton")


# ---- bad input -------------------------------------------------------------------------------


def _ok():
    return _features(SCALES)


@pytest.mark.parametrize(
    "make, kwargs, exc, match",
    [
        (lambda: ([], []), {}, ValueError, "feats_a must hold at least one scale"),
        (lambda: (_ok()[0], _ok()[1][:2]), {}, ValueError, "same number of scales"),
        (lambda: (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)), {}, TypeError, "feats_a must be a list"),
        (lambda: ([torch.randn(1, 3, 4)], [torch.randn(1, 3, 4)]), {}, ValueError, r"feats_a\[0\] must have 4 dimensions"),
        (lambda: ([torch.randn(1, 3, 4, 4)], [torch.randn(1, 2, 4, 4)]), {}, ValueError, "same shape"),
        (lambda: ([torch.ones(1, 3, 4, 4, dtype=torch.int32)], [torch.ones(1, 3, 4, 4, dtype=torch.int32)]), {}, TypeError, "floating-point"),
        (lambda: ([torch.randn(1, 3, 4, 4), torch.randn(2, 3, 2, 2)], [torch.randn(1, 3, 4, 4), torch.randn(2, 3, 2, 2)]), {}, ValueError, "batch size"),
        (_ok, {"out_size": 0}, ValueError, "out_size must be positive"),
        (_ok, {"out_size": (4, -1)}, ValueError, "out_size must be positive"),
        (_ok, {"out_size": "big"}, TypeError, "out_size"),
        (_ok, {"blur_sigma": -1.0}, ValueError, "blur_sigma"),
        (_ok, {"reduction": "max"}, ValueError, "reduction must be one of"),
        (_ok, {"backend": "jax"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(make, kwargs, exc, match):
    fa, fb = make()
    with pytest.raises(exc, match=match):
        cosine_distance_map(fa, fb, **kwargs)


# ---- the GPU launch configuration, run under the interpreter ------------------------------


@pytest.mark.parametrize(
    "reduction, sigma, out_size",
    [("mean", 4.0, (130, 70)), ("sum", 0.0, (70, 97)), ("prod", 1.0, (66, 40)), ("prod", 0.0, (40, 130))],
)
def test_gpu_tiles_match_reference(reduction, sigma, out_size):
    """Stage 2 at its GPU tiles (64x64 linear with 16-wide K chunks, 64x64 / 32x64 gather): several tiles, partial edges."""
    from fastuad.ops import cosmap
    from fastuad.ops._launch import gpu_tiles

    fa, fb = _features([(20, 16, 12), (40, 8, 6), (300, 4, 3)], batch=1, device=TRITON_DEVICE, seed=11)
    with gpu_tiles():
        assert cosmap._linear_tiles() == (64, 64, 16, 8)
        assert cosmap._stage2_tiles(True) == (64, 64, 32, 8) and cosmap._stage2_tiles(False) == (32, 64, 32, 4)
        got = cosine_distance_map(fa, fb, out_size=out_size, reduction=reduction, blur_sigma=sigma, backend="triton")
    want = cosine_distance_map_reference(
        [a.double() for a in fa], [b.double() for b in fb], out_size=out_size, reduction=reduction, blur_sigma=sigma
    )
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
