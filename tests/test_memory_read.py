"""memory_read: reference semantics, Triton forward/backward against it, gradcheck, bad input."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_DEVICE, float_dtypes_for_triton
from fastuad.ops import memory_entropy_loss, memory_read, memory_read_reference


def _data(n, m, d, k=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g)
    mem = torch.randn(*((k,) if k else ()), m, d, generator=g)
    ci = torch.randint(0, k, (n,), generator=g) if k else None
    dev = TRITON_DEVICE
    return q.to(dev, dtype), mem.to(dev, dtype), (ci.to(dev) if ci is not None else None)


def _naive(q, mem, ci, similarity, t, lam):
    """Row by row, straight from the contract (DESIGN.md #3)."""
    outs, ws = [], []
    for i in range(q.shape[0]):
        bank = mem if mem.dim() == 2 else mem[ci[i]]
        if similarity == "cosine":
            logits = F.cosine_similarity(q[i : i + 1], bank, dim=1, eps=1e-8) / t
        else:
            logits = bank @ q[i] / t
        w = torch.softmax(logits, 0)
        if lam > 0:
            w = F.relu(w - lam) * w / ((w - lam).abs() + 1e-12)
            w = w / w.sum().clamp_min(1e-12)
        outs.append(w @ bank)
        ws.append(w)
    return torch.stack(outs), torch.stack(ws)


@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("similarity,lam", [("cosine", 0.0), ("cosine", 0.05), ("dot", 0.1)])
def test_reference_matches_contract(k, similarity, lam):
    q, mem, ci = _data(9, 7, 5, k, torch.float64)
    out, w = memory_read_reference(q, mem, ci, similarity, 0.5, lam, return_weights=True)
    exp_out, exp_w = _naive(q, mem, ci, similarity, 0.5, lam)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(w, exp_w)


# (n, m, d, k, similarity, temperature, lambda, return_weights): sizes off the tile sizes.
CASES = [
    (37, 29, 20, None, "cosine", 0.5, 0.0, False),
    (37, 29, 20, None, "cosine", 0.1, 1 / 29, True),
    (21, 40, 9, None, "dot", 0.7, 0.03, False),
    (45, 21, 24, 3, "cosine", 0.1, 0.04, True),
    (19, 17, 33, 4, "dot", 1.0, 0.0, False),
]


def _fwd_bwd(backend, q, mem, ci, sim, t, lam, rw):
    x, y = q.clone().requires_grad_(), mem.clone().requires_grad_()
    res = memory_read(x, y, ci, sim, t, lam, rw, backend=backend)
    out, w = res if rw else (res, None)
    g = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    loss = (out * g).sum()
    if rw:  # gradients also flow through the returned weights (an entropy-style loss)
        loss = loss + (w * torch.linspace(0, 1, w.numel(), device=w.device).view_as(w)).sum()
    loss.backward()
    return [out.detach(), w.detach() if rw else None, x.grad, y.grad]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}m{c[1]}d{c[2]}k{c[3]}-{c[4]}-lam{c[6]:.2f}-w{int(c[7])}")
@pytest.mark.parametrize("dtype", float_dtypes_for_triton())
def test_triton_forward_backward_match_reference(case, dtype):
    n, m, d, k, sim, t, lam, rw = case
    q, mem, ci = _data(n, m, d, k, dtype, seed=n)
    got = _fwd_bwd("triton", q, mem, ci, sim, t, lam, rw)
    want = _fwd_bwd("torch", q, mem, ci, sim, t, lam, rw)
    assert got[0].dtype == torch.float32 and got[0].shape == (n, d)
    assert got[2].dtype == dtype and got[3].dtype == dtype
    for name, a, b in zip(("out", "weights", "grad_query", "grad_memory"), got, want):
        if b is None:
            continue
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
        else:  # fp16 gradients: compare relative to the largest one
            scale = b.float().abs().max().item()
            err = (a.float() - b.float()).abs().max().item()
            assert err <= 3e-3 * max(scale, 1.0), f"{name}: max error {err} (scale {scale})"


@pytest.mark.parametrize("k,sim,lam", [(None, "cosine", 0.0), (None, "dot", 0.08), (2, "cosine", 0.1)])
def test_triton_gradcheck_float64(k, sim, lam):
    q, mem, ci = _data(6, 7, 5, k, torch.float64, seed=3)
    q.requires_grad_()
    mem.requires_grad_()

    def fn(x, y):
        return memory_read(x, y, ci, sim, 0.5, lam, return_weights=True, backend="triton")

    assert torch.autograd.gradcheck(fn, (q, mem), eps=1e-6, atol=1e-5, fast_mode=True)


def test_triton_gradcheck_float64_full():
    q, mem, ci = _data(4, 5, 3, 2, torch.float64, seed=4)
    q.requires_grad_()
    mem.requires_grad_()
    fn = lambda x, y: memory_read(x, y, ci, "cosine", 0.3, 0.1, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, mem), eps=1e-6, atol=1e-5)


def test_triton_only_query_or_memory_requires_grad_and_strided_query():
    q, mem, _ = _data(20, 18, 32, None)
    q = q[:, ::2]  # strided view, D=16
    mem = mem[:, :16].contiguous()
    for need_q in (True, False):
        grads = {}
        for backend in ("torch", "triton"):
            x = q.clone().requires_grad_(need_q)
            y = mem.clone().requires_grad_(not need_q)
            memory_read(x, y, shrink_threshold=0.05, backend=backend).square().sum().backward()
            grads[backend] = x.grad if need_q else y.grad
        torch.testing.assert_close(grads["triton"], grads["torch"], atol=2e-5, rtol=1e-4)


def test_shrinkage_above_every_weight_reads_zero():
    """λ above every softmax weight: all weights shrink to 0, the sum clamps at 1e-12, output 0."""
    q, mem, _ = _data(5, 8, 6, None)
    out, w = memory_read(q, mem, shrink_threshold=0.9, temperature=10.0, return_weights=True, backend="triton")
    ref_out, ref_w = memory_read_reference(q, mem, shrink_threshold=0.9, temperature=10.0, return_weights=True)
    assert float(ref_w.abs().max()) == 0.0
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)


def test_weights_are_sparse_and_normalised():
    q, mem, ci = _data(12, 10, 8, 2)
    _, w = memory_read(q, mem, ci, temperature=0.05, shrink_threshold=0.1, return_weights=True, backend="triton")
    torch.testing.assert_close(w.sum(1), torch.ones(12), atol=1e-5, rtol=0)
    assert bool(((w == 0) | (w > 0.1)).all())


def test_auto_backend_on_cpu_is_reference():
    q, mem, ci = _data(6, 5, 4, 2)
    q, mem, ci = q.cpu(), mem.cpu(), ci.cpu()
    torch.testing.assert_close(memory_read(q, mem, ci), memory_read_reference(q, mem, ci), atol=0, rtol=0)


def test_entropy_loss():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    expected = (0.0 + (-2 * 0.5 * torch.log(torch.tensor(0.5 + 1e-12)))) / 2
    torch.testing.assert_close(memory_entropy_loss(w), expected)
    w = torch.softmax(torch.randn(4, 3, 7), -1).requires_grad_()
    loss = memory_entropy_loss(w)
    loss.backward()
    assert loss.item() > 0 and w.grad is not None
    with pytest.raises(TypeError, match="weights"):
        memory_entropy_loss(torch.ones(3, dtype=torch.int64))


_Q, _M = torch.randn(4, 8), torch.randn(5, 8)
_M3 = torch.randn(3, 5, 8)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((torch.randn(4), _M), {}, ValueError, "query must have 2 dimensions"),
        ((_Q, torch.randn(2, 3, 5, 8)), {}, ValueError, "memory must have 2 dimensions"),
        ((_Q, torch.randn(5, 7)), {}, ValueError, "feature dim"),
        ((_Q, _M.double()), {}, TypeError, "same dtype"),
        ((_Q.long(), _M.long()), {}, TypeError, "query must be a floating-point"),
        ((_Q, _M3), {}, ValueError, "class_index"),
        ((_Q, _M3, torch.tensor([0, 1, 2, 3])), {}, IndexError, "class_index must lie in"),
        ((_Q, _M3, torch.tensor([0, -1, 2, 0])), {}, IndexError, "class_index"),
        ((_Q, _M3, torch.tensor([0, 1, 2])), {}, ValueError, "class_index must have shape"),
        ((_Q, _M3, torch.tensor([0.0, 1, 2, 0])), {}, TypeError, "class_index must be an int64"),
        ((_Q, _M, torch.tensor([0, 0, 0, 0])), {}, ValueError, "class_index is only used"),
        ((_Q, _M), {"temperature": 0.0}, ValueError, "temperature"),
        ((_Q, _M), {"shrink_threshold": 1.0}, ValueError, "shrink_threshold"),
        ((_Q, _M), {"shrink_threshold": -0.1}, ValueError, "shrink_threshold"),
        ((_Q, _M), {"similarity": "l2"}, ValueError, "similarity"),
        ((_Q, _M), {"backend": "cuda"}, Exception, "no 'cuda' backend"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        memory_read(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k,lam,rw", [(None, 0.05, False), (2, 0.1, True)])
def test_triton_split_tf32_products_match_reference(monkeypatch, dtype, k, lam, rw):
    """The GPU rule (3xTF32) under the interpreter: 16-bit inputs take the two-product path of
    ``_dot_exact_b`` (the operand rounded to TF32 plus its exact remainder); fp32 the plain one."""
    if dtype not in float_dtypes_for_triton():
        pytest.skip(f"{dtype} not supported by this Triton build")
    import fastuad.ops.memory as memory_mod

    monkeypatch.setattr(memory_mod, "dot_precision", lambda device, dt: "tf32x3")
    n, m, d = 37, 21, 40
    q, mem, ci = _data(n, m, d, k, dtype, seed=5)
    got = _fwd_bwd("triton", q, mem, ci, "cosine", 0.5, lam, rw)
    want = _fwd_bwd("torch", q, mem, ci, "cosine", 0.5, lam, rw)
    for name, a, b in zip(("out", "weights", "grad_query", "grad_memory"), got, want):
        if b is None:
            continue
        scale = b.float().abs().max().item()
        err = (a.float() - b.float()).abs().max().item()
        tol = 2e-5 if dtype == torch.float32 else 3e-3
        assert err <= tol * max(scale, 1.0), f"{name}: max error {err} (scale {scale})"
