"""local_attention: the dense reference's semantics, the Triton kernels against it, bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastuad

from conftest import TRITON_DEVICE, float_dtypes_for_triton
from fastuad.ops import local_attention, local_attention_reference, window_mask
from fastuad.ops.local_attn import local_attention_triton_backward, local_attention_triton_forward


def _qkv(b, bk, grid, heads, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    q = torch.randn(b, h, w, heads, d, generator=g)
    k = torch.randn(bk, h, w, heads, d, generator=g)
    v = torch.randn(bk, h, w, heads, d, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _loop_attention(q, k, v, window, mode, scale):
    """Per query, the key set written out with Python loops: the contract, independent of masks."""
    B, H, W, heads, d = q.shape
    wh, ww = (window, window) if isinstance(window, int) else window
    out = torch.zeros(B, H, W, heads, d, dtype=torch.float64)
    for b, i, j, h in itertools.product(range(B), range(H), range(W), range(heads)):
        keys = [
            (a, c)
            for a, c in itertools.product(range(H), range(W))
            if (abs(a - i) <= wh // 2 and abs(c - j) <= ww // 2) == (mode == "inside")
        ]
        if not keys:
            continue  # outside mode, window covering the grid: defined as 0
        kb = b if k.shape[0] > 1 else 0
        ks = torch.stack([k[kb, a, c, h] for a, c in keys]).double()
        vs = torch.stack([v[kb, a, c, h] for a, c in keys]).double()
        out[b, i, j, h] = torch.softmax(scale * ks @ q[b, i, j, h].double(), 0) @ vs
    return out


@pytest.mark.parametrize(
    "grid, window, mode, bk",
    [((4, 5), 3, "inside", 2), ((4, 5), (3, 5), "outside", 1), ((3, 6), (5, 1), "inside", 1), ((4, 4), (7, 5), "outside", 2)],
)
def test_reference_matches_explicit_key_sets(grid, window, mode, bk):
    q, k, v = _qkv(2, bk, grid, 2, 4, torch.float64, "cpu")
    got = local_attention_reference(q, k, v, window, mode, scale=0.7)
    torch.testing.assert_close(got, _loop_attention(q, k, v, window, mode, 0.7), atol=1e-12, rtol=1e-12)


def test_reference_inside_equals_masked_sdpa():
    q, k, v = _qkv(2, 2, (5, 6), 3, 8, torch.float32, "cpu")
    mask = window_mask((5, 6), (3, 5), "inside")
    ref = local_attention_reference(q, k, v, (3, 5), "inside")
    sdpa = F.scaled_dot_product_attention(*(t.reshape(2, 30, 3, 8).transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    torch.testing.assert_close(ref, sdpa.transpose(1, 2).reshape(ref.shape), atol=1e-5, rtol=1e-5)


def test_window_is_truncated_at_borders():
    """The docstring's picture: a 3x3 window on a 4x5 grid has 4 keys at corners, 9 inside."""
    mask = window_mask((4, 5), 3, "inside").view(4, 5, 4, 5)
    assert mask[0, 0].sum() == 4 and mask[1, 2].sum() == 9 and mask[3, 4].sum() == 4 and mask[0, 2].sum() == 6
    assert mask[0, 0, :2, :2].all() and not mask[0, 0, 2:].any() and not mask[0, 0, :, 2:].any()
    outside = window_mask((4, 5), 3, "outside").view(4, 5, 4, 5)
    assert torch.equal(outside, ~mask)


def test_outside_without_keys_is_zero():
    # (7, 5) on 4x4: every row and, from columns 1 and 2, every column is in the window.
    q, k, v = _qkv(1, 1, (4, 4), 1, 4, torch.float64, "cpu")
    q.requires_grad_()
    out = local_attention_reference(q, k, v, (7, 5), "outside")
    assert (out[:, :, 1:3] == 0).all() and (out[:, :, [0, 3]].abs() > 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, 1:3] == 0).all()


# (B, Bk, grid, heads, d, window, mode): grids off the 16-token interpreter tiles, rectangular
# windows, broadcast k/v, head dims off powers of two, windows as wide as the grid, a single row.
CASES = [
    (2, 2, (5, 7), 2, 16, 3, "inside"),
    (2, 1, (5, 7), 2, 16, (3, 5), "outside"),
    (3, 1, (6, 5), 1, 20, (5, 3), "inside"),
    (2, 2, (9, 4), 2, 8, (1, 7), "outside"),
    (1, 1, (4, 4), 1, 16, (7, 5), "outside"),
    (2, 1, (1, 40), 1, 16, (1, 3), "inside"),
    (2, 2, (3, 11), 2, 32, (5, 21), "outside"),
]


def _fwd_bwd(q, k, v, window, mode, backend, grad, scale=None):
    x, y, z = (t.clone().requires_grad_() for t in (q, k, v))
    out = local_attention(x, y, z, window, mode, scale=scale, backend=backend)
    (out * grad.to(out.dtype)).sum().backward()
    return out, x.grad, y.grad, z.grad


def _tol(dtype):
    return {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 6e-3, "rtol": 2e-2}


@pytest.mark.parametrize("dtype", float_dtypes_for_triton())
@pytest.mark.parametrize("b, bk, grid, heads, d, window, mode", CASES)
def test_triton_forward_backward_match_reference(b, bk, grid, heads, d, window, mode, dtype):
    q, k, v = _qkv(b, bk, grid, heads, d, dtype, TRITON_DEVICE)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(TRITON_DEVICE)
    got = _fwd_bwd(q, k, v, window, mode, "triton", grad)
    want = _fwd_bwd(q, k, v, window, mode, "torch", grad)
    assert got[0].dtype == torch.float32 and got[0].shape == q.shape
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == (torch.float32 if name == "out" else dtype), name
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.float(), w.float(), **_tol(dtype), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32), (32, 32)])
@pytest.mark.parametrize("mode", ["inside", "outside"])
def test_triton_tile_shapes(blocks, mode):
    """Query and key tiles of other sizes: different band edges, multi-row tiles, skipped tiles."""
    q, k, v = _qkv(2, 1, (7, 9), 1, 16, torch.float32, TRITON_DEVICE, seed=2)
    radii = (1, 2)
    o, lse = local_attention_triton_forward(q, k, v, radii, mode, 0.3, blocks=blocks)
    want = local_attention_reference(q, k, v, (3, 5), mode, 0.3)
    torch.testing.assert_close(o, want, atol=2e-5, rtol=1e-5)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE)
    dq, dk, dv = local_attention_triton_backward(q, k, v, o, lse, grad, radii, mode, 0.3, blocks=blocks)
    x, y, z = (t.clone().requires_grad_() for t in (q, k, v))
    torch.autograd.backward(local_attention_reference(x, y, z, (3, 5), mode, 0.3), grad)
    for got, ref in ((dq, x.grad), (dk, y.grad), (dv, z.grad)):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_triton_scale_and_strided_inputs():
    q, k, v = _qkv(2, 2, (4, 6), 2, 16, torch.float32, TRITON_DEVICE, seed=3)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    kt = k[..., ::1, :].permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)
    got = local_attention(qt, kt, v, 3, "inside", scale=0.2, backend="triton")
    torch.testing.assert_close(got, local_attention_reference(q, k, v, 3, "inside", 0.2), atol=2e-5, rtol=1e-5)


def test_triton_only_some_inputs_require_grad():
    q, k, v = _qkv(2, 1, (4, 5), 1, 16, torch.float32, TRITON_DEVICE, seed=4)
    for which in range(3):
        ins = [t.clone() for t in (q, k, v)]
        ref = [t.clone() for t in (q, k, v)]
        ins[which].requires_grad_()
        ref[which].requires_grad_()
        local_attention(*ins, 3, "outside", backend="triton").sum().backward()
        local_attention_reference(*ref, 3, "outside").sum().backward()
        torch.testing.assert_close(ins[which].grad, ref[which].grad, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, window, bk", [("inside", (3, 5), 1), ("outside", 3, 2)])
def test_triton_gradcheck_float64(mode, window, bk):
    q, k, v = _qkv(2, bk, (3, 4), 1, 3, torch.float64, TRITON_DEVICE, seed=6)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda x, y, z: local_attention(x, y, z, window, mode, backend="triton"),
        inputs,
        eps=1e-6,
        atol=1e-6,
        fast_mode=True,  # checks random projections uᵀJv: a few forward calls instead of one per element
    )


def test_auto_backend_on_cpu_is_the_torch_backend():
    q, k, v = _qkv(1, 1, (3, 3), 1, 4, torch.float32, "cpu")
    with fastuad.ops.trace() as calls:
        got = local_attention(q, k, v, 3)
    assert [c.backend for c in calls] == ["torch"]
    torch.testing.assert_close(got, local_attention_reference(q, k, v, 3), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize(
    "grid, window, mode, bk",
    [((5, 6), 3, "inside", 3), ((5, 6), (3, 5), "outside", 1), ((4, 4), (7, 5), "outside", 3), ((3, 7), (1, 5), "inside", 1)],
)
def test_torch_backend_sdpa_matches_the_dense_reference_forward_and_backward(grid, window, mode, bk, dtype):
    """The "torch" backend (fused SDPA with a cached -inf bias) equals the dense reference, gradients included."""
    q, k, v = (t.requires_grad_() for t in _qkv(3, bk, grid, 2, 8, dtype, "cpu", seed=4))
    got = local_attention(q, k, v, window, mode, scale=0.6, backend="torch")
    want = local_attention_reference(q, k, v, window, mode, scale=0.6)
    assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(got, want, **tol)
    grad = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(5))
    g_got = torch.autograd.grad(got, (q, k, v), grad)
    g_want = torch.autograd.grad(want, (q, k, v), grad)
    if dtype == torch.float16:  # the gradients come back in the inputs' fp16: compare at its resolution
        tol = dict(atol=1e-3, rtol=1e-3)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **tol)


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


Q = _t(2, 4, 4, 2, 8)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((Q, Q, Q, 4), {}, ValueError, "window must be positive and odd"),
        ((Q, Q, Q, 0), {}, ValueError, "window must be positive and odd"),
        ((Q, Q, Q, (3, -1)), {}, ValueError, "window must be positive and odd"),
        ((Q, Q, Q, 9), {}, ValueError, r"larger than 2\*height-1 = 7"),
        ((Q, Q, Q, (3, 9)), {}, ValueError, r"larger than 2\*width-1"),
        ((Q, Q, Q, 3.0), {}, TypeError, "window must be an odd int"),
        ((Q, Q, Q, (3, 3, 3)), {}, TypeError, "window must be an odd int"),
        ((Q, Q, Q, 3), {"mode": "around"}, ValueError, "mode must be one of"),
        ((Q, _t(2, 4, 4, 2, 4), _t(2, 4, 4, 2, 4), 3), {}, ValueError, "head dim 8"),
        ((Q, _t(2, 4, 4, 1, 8), _t(2, 4, 4, 1, 8), 3), {}, ValueError, "number of heads"),
        ((Q, _t(3, 4, 4, 2, 8), _t(3, 4, 4, 2, 8), 3), {}, ValueError, "batch must be 1"),
        ((Q, _t(2, 4, 5, 2, 8), _t(2, 4, 5, 2, 8), 3), {}, ValueError, r"grid \(H, W\)"),
        ((Q, Q, _t(1, 4, 4, 2, 8), 3), {}, ValueError, "k and v must have the same shape"),
        ((_t(2, 16, 2, 8), Q, Q, 3), {}, ValueError, "q must have 5 dimensions"),
        ((Q, _t(2, 4, 4, 16), Q, 3), {}, ValueError, "k must have 5 dimensions"),
        ((Q, Q, Q.double(), 3), {}, TypeError, "v must have q's dtype"),
        ((Q.long(), Q, Q, 3), {}, TypeError, "q must be a floating-point"),
        (([0.0], Q, Q, 3), {}, TypeError, "q must be a torch.Tensor"),
        ((Q, Q, Q, 3), {"scale": -1.0}, ValueError, "scale"),
        ((Q, Q, Q, 3), {"backend": "numpy"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        local_attention(*args, **kwargs)
