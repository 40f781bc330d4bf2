"""cosine_distance: every backend against the reference, forward and backward, and bad input."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_DEVICE, float_dtypes_for_triton
from fastuad.ops import BackendUnavailableError, cosine_distance, cosine_distance_reference

# (B, C, H, W): odd sizes, channel counts off the block sizes, a single pixel, a single channel.
SHAPES = [(2, 20, 9, 11), (1, 1, 5, 3), (3, 37, 1, 1), (2, 64, 16, 16), (1, 200, 4, 6)]


def _pair(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    b = 0.6 * a + torch.randn(shape, generator=g)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def _tol(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype in (torch.float32, torch.float64) else {"atol": 1e-4, "rtol": 1e-4}


def test_reference_is_torch_cosine_similarity():
    a, b = _pair((2, 5, 3, 4), torch.float32, "cpu")
    expected = 1 - F.cosine_similarity(a, b, dim=1, eps=1e-8)
    torch.testing.assert_close(cosine_distance_reference(a, b), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", float_dtypes_for_triton())
def test_triton_forward_matches_reference(shape, dtype):
    a, b = _pair(shape, dtype, TRITON_DEVICE)
    out = cosine_distance(a, b, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2], shape[3])
    torch.testing.assert_close(out, cosine_distance_reference(a, b), **_tol(dtype))


def test_triton_forward_strided_and_channels_last():
    a, b = _pair((2, 12, 10, 14), torch.float32, TRITON_DEVICE)
    views = [
        (a[:, ::2], b[:, 1::2]),  # channel-strided slices
        (a.transpose(2, 3), b.transpose(2, 3)),  # non-contiguous spatial
        (a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)),
    ]
    for x, y in views:
        torch.testing.assert_close(cosine_distance(x, y, backend="triton"), cosine_distance_reference(x, y), atol=1e-5, rtol=1e-5)


def test_zero_vectors_follow_eps_clamp():
    a, b = _pair((1, 8, 4, 4), torch.float32, TRITON_DEVICE)
    a[:, :, 0, 0] = 0.0
    out = cosine_distance(a, b, backend="triton")
    torch.testing.assert_close(out, cosine_distance_reference(a, b), atol=1e-6, rtol=1e-6)
    assert out[0, 0, 0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(2, 20, 9, 11), (1, 3, 2, 5)])
@pytest.mark.parametrize("dtype", float_dtypes_for_triton())
def test_triton_backward_matches_reference(shape, dtype):
    a, b = _pair(shape, dtype, TRITON_DEVICE, seed=1)
    grad = torch.randn((shape[0], shape[2], shape[3]), generator=torch.Generator().manual_seed(2)).to(TRITON_DEVICE)
    grads = {}
    for backend in ("torch", "triton"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        (cosine_distance(x, y, backend=backend) * grad).sum().backward()
        grads[backend] = (x.grad, y.grad)
    for got, want in zip(grads["triton"], grads["torch"]):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **(_tol(dtype) if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-2}))


def test_triton_backward_only_one_input_requires_grad():
    a, b = _pair((2, 6, 3, 3), torch.float32, TRITON_DEVICE)
    x = a.clone().requires_grad_()
    cosine_distance(x, b, backend="triton").sum().backward()
    x_ref = a.clone().requires_grad_()
    cosine_distance_reference(x_ref, b).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_triton_gradcheck_float64():
    a, b = _pair((1, 5, 3, 2), torch.float64, TRITON_DEVICE, seed=3)
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: cosine_distance(x, y, backend="triton"), (a, b), eps=1e-6, atol=1e-6)


def test_auto_backend_on_cpu_is_reference():
    a, b = _pair((1, 4, 3, 3), torch.float32, "cpu")
    torch.testing.assert_close(cosine_distance(a, b), cosine_distance_reference(a, b), atol=0, rtol=0)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4)), {}, ValueError, "a must have 4 dimensions"),
        ((torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)), {}, ValueError, "same shape"),
        ((torch.ones(1, 3, 4, 4, dtype=torch.int64), torch.ones(1, 3, 4, 4, dtype=torch.int64)), {}, TypeError, "floating-point"),
        ((torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4).double()), {}, TypeError, "same dtype"),
        (([1.0], torch.randn(1, 3, 4, 4)), {}, TypeError, "a must be a torch.Tensor"),
        ((torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)), {"eps": 0.0}, ValueError, "eps"),
        ((torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)), {"backend": "numpy"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cosine_distance(*args, **kwargs)


def test_cuda_backend_is_not_offered_for_cosine_distance():
    a, b = _pair((1, 4, 3, 3), torch.float32, "cpu")
    with pytest.raises(BackendUnavailableError, match="no 'cuda' backend"):
        cosine_distance(a, b, backend="cuda")


@pytest.mark.parametrize("split", [1, 2, 3, 7])
def test_triton_channel_split_forward_and_backward(split):
    """Small grids split the channel loop across programs; every split count gives the same answer."""
    from fastuad.ops.cosdist import cosine_distance_triton_forward

    a, b = _pair((2, 150, 3, 5), torch.float32, TRITON_DEVICE, seed=4)
    d, coef = cosine_distance_triton_forward(a, b, 1e-8, with_coef=True, split=split)
    torch.testing.assert_close(d, cosine_distance_reference(a, b), atol=1e-5, rtol=1e-5)
    d1, coef1 = cosine_distance_triton_forward(a, b, 1e-8, with_coef=True, split=1)
    torch.testing.assert_close(coef, coef1, atol=1e-6, rtol=1e-5)


# ---- the GPU launch configuration, run under the interpreter ------------------------------

# (shape, multiprocessor count, expected (BLOCK_P, BLOCK_C, warps, splits)): the SM count moves
# the grid across every branch of pixel_blocks / channel_splits on a small problem.
GPU_PLANS = [
    ((2, 40, 12, 20), 1, (32, 16, 4, 1)),  # many programs per SM: 16-channel chunks
    ((2, 40, 12, 20), 4, (32, 32, 4, 1)),  # a few per SM: 32-channel chunks, 4 warps
    ((2, 40, 12, 20), 132, (32, 32, 8, 1)),  # under 4 per SM: 8 warps
    ((1, 300, 4, 6), 132, (32, 32, 8, 2)),  # one tiny map, many channels: channel splits + finalize
]


@pytest.mark.parametrize(
    "shape, sms, plan, dtype",
    [pytest.param(*p, torch.float32, id=f"sms{p[1]}-{p[0]}-fp32") for p in GPU_PLANS]
    + [pytest.param(*p, dt, id=f"sms{p[1]}-{p[0]}-{str(dt)[6:]}") for p in GPU_PLANS[2:] for dt in float_dtypes_for_triton()[1:]],
)
def test_gpu_launch_configuration_matches_reference(monkeypatch, shape, sms, plan, dtype):
    """Forward and backward at the tiles, warps and splits a GPU with ``sms`` multiprocessors gets."""
    from fastuad.ops import cosdist
    from fastuad.ops._launch import gpu_tiles

    monkeypatch.setattr(cosdist, "num_sms", lambda device: sms)
    B, C, H, W = shape
    with gpu_tiles():
        bp, bc, warps, _, _, split = cosdist._forward_plan(B, C, H, W, torch.device(TRITON_DEVICE), None)
        assert (bp, bc, warps, split) == plan
        a, b = _pair(shape, dtype, TRITON_DEVICE, seed=3)
        a.requires_grad_(True)
        b.requires_grad_(True)
        out = cosine_distance(a, b, backend="triton")
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(TRITON_DEVICE)
        ga, gb = torch.autograd.grad(out, (a, b), g)
    ar, br = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    ref = cosine_distance_reference(ar, br)
    gar, gbr = torch.autograd.grad(ref, (ar, br), g.double())
    torch.testing.assert_close(out, ref.float(), **_tol(dtype))
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-2}
    torch.testing.assert_close(ga.double(), gar, **tol)
    torch.testing.assert_close(gb.double(), gbr, **tol)
