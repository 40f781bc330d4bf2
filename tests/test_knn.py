"""knn: the tiled reference against torch.cdist, the Triton kernel against the reference, bad input."""

import pytest
import torch

from conftest import TRITON_DEVICE, float_dtypes_for_triton
from fastuad.ops import BackendUnavailableError, knn, knn_reference
from fastuad.ops.knn_search import knn_cdist_topk, knn_chunked_matmul_topk


def _data(n, m, d, dtype=torch.float32, seed=0, device=TRITON_DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(device, dtype), torch.randn(m, d, generator=g).to(device, dtype)


def _exact(q, b):
    return torch.cdist(q.double(), b.double())


def _check(dist, index, q, b, k, atol):
    """Distances ascending and equal to the exact k smallest; indices point at rows that far away."""
    n = q.shape[0]
    assert dist.shape == (n, k) and index.shape == (n, k) and index.dtype == torch.int64
    exact = _exact(q, b)
    want = exact.topk(k, dim=1, largest=False).values
    torch.testing.assert_close(dist.double(), want, atol=atol, rtol=1e-5)
    torch.testing.assert_close(exact.gather(1, index), want, atol=atol, rtol=1e-5)
    assert bool((dist[:, 1:] >= dist[:, :-1]).all())
    assert bool((index >= 0).all() and (index < b.shape[0]).all())


@pytest.mark.parametrize("k", [1, 4])
def test_reference_tiles_merge_exactly(k):
    q, b = _data(23, 61, 7, device="cpu")
    d, i = knn_reference(q, b, k, query_chunk=5, bank_chunk=9)  # many tiles, some narrower than k
    _check(d, i, q, b, k, atol=1e-5)
    d2, i2 = knn_reference(q, b, k)
    torch.testing.assert_close(d, d2)


@pytest.mark.parametrize("n,m,d,k", [(21, 70, 20, 5), (20, 33, 70, 1), (17, 50, 9, 9), (3, 40, 5, 40)])
@pytest.mark.parametrize("dtype", float_dtypes_for_triton())
def test_triton_matches_reference(n, m, d, k, dtype):
    q, b = _data(n, m, d, dtype, seed=n + k)
    dist, index = knn(q, b, k, backend="triton")
    ref_d, _ = knn_reference(q, b, k)
    assert dist.dtype == torch.float32
    torch.testing.assert_close(dist, ref_d, atol=1e-4, rtol=1e-5)
    _check(dist, index, q, b, k, atol=1e-4)


def test_triton_k64_and_ties():
    """The largest fused k, and duplicated bank rows (equal distances: any order, same values)."""
    q, b = _data(5, 40, 3, seed=1)
    b = torch.cat([b, b[:30]])  # 70 rows, 30 duplicated
    dist, index = knn(q, b, 64, backend="triton")
    _check(dist, index, q, b, 64, atol=1e-4)


def test_triton_exact_match_gives_zero_and_strided_inputs():
    q, b = _data(12, 30, 16, seed=2)
    q[:4] = b[5:9]
    dist, index = knn(q[:, ::1], b.t().contiguous().t(), 2, backend="triton")  # bank column-major
    assert torch.equal(index[:4, 0].cpu(), torch.arange(5, 9))
    # |q|² - 2q·b + |b|² cancels to rounding error (clamped at 0, never NaN): sqrt(~1e-6·|q|²)
    assert float(dist[:4, 0].max()) < 1e-2 and bool(torch.isfinite(dist).all())
    _check(dist, index, q, b, 2, atol=1e-2)


def test_baselines_agree():
    q, b = _data(30, 45, 8, device="cpu")
    ref = knn_reference(q, b, 3)
    for fn in (lambda: knn_chunked_matmul_topk(q, b, 3, query_chunk=7), lambda: knn_cdist_topk(q, b, 3)):
        d, i = fn()
        torch.testing.assert_close(d, ref[0], atol=1e-4, rtol=1e-5)
        _check(d, i, q, b, 3, atol=1e-4)
    d, i = knn_chunked_matmul_topk(q, b, 1)
    torch.testing.assert_close(d, ref[0][:, :1], atol=1e-4, rtol=1e-5)


def test_auto_on_cpu_is_reference_and_large_k_falls_back():
    q, b = _data(6, 80, 4, device="cpu")
    torch.testing.assert_close(knn(q, b, 3)[0], knn_reference(q, b, 3)[0], atol=0, rtol=0)
    with pytest.raises(BackendUnavailableError, match="k <= 64"):
        knn(q, b, 65, backend="triton")
    d, _ = knn(q, b, 65, backend="torch")
    assert d.shape == (6, 65)


def test_float64_reference_keeps_float64():
    q, b = _data(4, 9, 3, torch.float64, device="cpu")
    d, _ = knn(q, b, 2)
    assert d.dtype == torch.float64


_Q, _B = torch.randn(4, 8), torch.randn(6, 8)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((_Q, _B, 7), ValueError, "k must be at most the bank size"),
        ((_Q, _B, 0), ValueError, "k must be >= 1"),
        ((_Q, _B, 2.0), TypeError, "k must be an int"),
        ((_Q, torch.randn(6, 5), 1), ValueError, "feature dim"),
        ((_Q, _B.half(), 1), TypeError, "same dtype"),
        ((_Q.long(), _B.long(), 1), TypeError, "query must be a floating-point"),
        ((torch.randn(4), _B, 1), ValueError, "query must have 2 dimensions"),
        ((_Q, torch.randn(2, 6, 8), 1), ValueError, "bank must have 2 dimensions"),
    ],
)
def test_bad_input_names_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        knn(*args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_ranks_last_on_every_backend(backend):
    """A NaN bank row is never a neighbour while numbers remain; a NaN query gets NaN distances.

    Without the NaN handling the Triton kernel clamped a NaN squared distance to 0 and returned
    the NaN row as every query's nearest neighbour at distance 0.
    """
    q, b = _data(6, 20, 8, seed=3)
    b[4] = float("nan")
    q[5] = float("nan")
    dist, index = knn(q, b, 3, backend=backend)
    ref_d, _ = knn_reference(q, b, 3)
    torch.testing.assert_close(dist, ref_d, atol=1e-4, rtol=1e-5, equal_nan=True)
    assert not bool((index[:5] == 4).any())
    assert bool(torch.isnan(dist[5]).all()) and bool(torch.isfinite(dist[:5]).all())
    # k larger than the number of finite rows: the NaN row comes last, as NaN
    d_all, i_all = knn(q[:1], b, 20, backend=backend)
    assert int(i_all[0, -1]) == 4 and bool(torch.isnan(d_all[0, -1])) and bool(torch.isfinite(d_all[0, :-1]).all())


def test_bank_offsets_beyond_int32():
    """Bank rows 2**30 elements apart: the third row starts at element 2**31, where the old int32
    offset ``j * stride`` wrapped negative (a wrong row or a crash). Only three rows of the
    4 GiB fp16 storage are touched."""
    storage = torch.empty(2**31 + 16, dtype=torch.float16)
    bank = storage.as_strided((3, 16), (2**30, 1))
    bank.copy_(torch.randn(3, 16).half())
    q = torch.randn(5, 16).half()
    if TRITON_DEVICE != "cpu":
        pytest.skip("a 4 GiB strided bank is a CPU-only test")
    dist, index = knn(q, bank, 2, backend="triton")
    ref_d, _ = knn_reference(q, bank.contiguous(), 2)
    torch.testing.assert_close(dist, ref_d, atol=1e-3, rtol=1e-4)
    _check(dist, index, q, bank.contiguous(), 2, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bank_sq_norms_are_used_and_checked(backend):
    from fastuad.ops.knn_search import bank_sq_norms

    q, b = _data(7, 30, 12, seed=4)
    norms = bank_sq_norms(b)
    torch.testing.assert_close(norms, b.double().pow(2).sum(1).float(), atol=1e-4, rtol=1e-5)
    d1, i1 = knn(q, b, 3, backend=backend, bank_sq_norms=norms)
    torch.testing.assert_close(d1, knn(q, b, 3, backend=backend)[0])
    # the norms given are the ones used (not recomputed): inflate one row's norm and it is never chosen
    bad = norms.clone()
    bad[i1[:, 0]] += 1e6
    _, i2 = knn(q, b, 1, backend=backend, bank_sq_norms=bad)
    assert not bool((i2[:, 0] == i1[:, 0]).any())
    with pytest.raises(ValueError, match="bank_sq_norms must be a tensor"):
        knn(q, b, 1, backend=backend, bank_sq_norms=norms[:-1])
    with pytest.raises(TypeError, match="bank_sq_norms must be"):
        knn(q, b, 1, backend=backend, bank_sq_norms=norms.double())


def test_bank_sq_norms_chunks_half_banks_in_float32():
    from fastuad.ops.knn_search import bank_sq_norms

    b = (torch.randn(37, 20) * 300).half()  # squares overflow float16
    got = bank_sq_norms(b, chunk_elems=100)  # 5 rows per chunk
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, b.float().pow(2).sum(1))
