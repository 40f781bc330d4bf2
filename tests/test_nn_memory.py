"""MemoryModule and MemoryBank: shapes, class-aware reads, training signal, coreset, checkpoints."""

import io

import pytest
import torch

from conftest import TRITON_DEVICE
from fastuad.nn import MemoryBank, MemoryModule, k_center_greedy
from fastuad.ops import knn_reference, memory_entropy_loss, memory_read_reference


def test_memory_module_reads_like_the_op_and_learns():
    torch.manual_seed(0)
    mod = MemoryModule(num_slots=10, dim=6, temperature=0.5)
    assert mod.shrink_threshold == pytest.approx(0.1)  # default λ = 1/M
    x = torch.randn(2, 3, 4, 6)
    out, w = mod(x, return_weights=True)
    assert out.shape == x.shape and w.shape == (2, 3, 4, 10)
    ref = memory_read_reference(x.reshape(-1, 6), mod.memory.detach(), temperature=0.5, shrink_threshold=0.1)
    torch.testing.assert_close(out.reshape(-1, 6), ref)
    (out.square().mean() + 0.01 * memory_entropy_loss(w)).backward()
    assert mod.memory.grad is not None and mod.memory.grad.abs().sum() > 0


def test_class_aware_memory_per_sample_and_per_row_index():
    torch.manual_seed(1)
    mod = MemoryModule(num_slots=5, dim=4, num_classes=3, shrink_threshold=0.0)
    x = torch.randn(2, 7, 4)
    cls = torch.tensor([2, 0])
    out = mod(x, cls)
    for b in range(2):  # sample b reads only bank cls[b]
        torch.testing.assert_close(out[b], memory_read_reference(x[b], mod.memory[cls[b]].detach()))
    torch.testing.assert_close(mod(x, cls[:, None].expand(2, 7)), out)
    with pytest.raises(ValueError, match="class_index"):
        mod(x)
    with pytest.raises(ValueError, match="class_index is only used"):
        MemoryModule(5, 4)(x, cls)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 4\]"):
        mod(torch.randn(2, 3), cls)


def test_memory_module_triton_backend():
    torch.manual_seed(2)
    mod = MemoryModule(num_slots=9, dim=8, num_classes=2, backend="triton").to(TRITON_DEVICE)
    ref = MemoryModule(num_slots=9, dim=8, num_classes=2, backend="torch").to(TRITON_DEVICE)
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(5, 8, device=TRITON_DEVICE)
    cls = torch.tensor([0, 1, 1, 0, 1], device=TRITON_DEVICE)
    for m in (mod, ref):
        m(x, cls).sum().backward()
    torch.testing.assert_close(mod.memory.grad, ref.memory.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [{"num_slots": 0, "dim": 4}, {"num_slots": 4, "dim": 4, "shrink_threshold": 1.0},
                                    {"num_slots": 4, "dim": 4, "temperature": 0}, {"num_slots": 4, "dim": 4, "similarity": "l1"},
                                    {"num_slots": 4, "dim": 4, "num_classes": 0}])
def test_memory_module_bad_config(kwargs):
    with pytest.raises(ValueError):
        MemoryModule(**kwargs)


def test_k_center_greedy_covers_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 20
    feats = (centres[:, None] + 0.1 * torch.randn(5, 40, 32, generator=g)).reshape(200, 32)
    idx = k_center_greedy(feats, 5, projection_dim=8)
    assert idx.dtype == torch.int64 and len(set(idx.tolist())) == 5
    assert sorted((idx // 40).tolist()) == [0, 1, 2, 3, 4]  # one pick per cluster
    torch.testing.assert_close(idx, k_center_greedy(feats, 5, projection_dim=8))  # seeded
    with pytest.raises(ValueError, match="num_samples"):
        k_center_greedy(feats, 0)


def test_memory_bank_fit_search_and_checkpoint():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(300, 16, generator=g)
    bank = MemoryBank(16).fit(feats, coreset_ratio=0.1)
    assert len(bank) == 30
    q = torch.randn(7, 16, generator=g)
    d, i = bank(q, k=3)
    rd, _ = knn_reference(q, bank.features, 3)
    torch.testing.assert_close(d, rd)
    # Coreset property: every feature is within the coreset's covering radius of a kept one.
    cover = torch.cdist(feats, bank.features).min(1).values.max()
    assert cover < torch.cdist(feats, feats[:30]).min(1).values.max()

    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    restored = MemoryBank(16)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(restored.features, bank.features)
    torch.testing.assert_close(restored(q, k=3)[0], d)


def test_memory_bank_errors():
    bank = MemoryBank(4)
    with pytest.raises(RuntimeError, match="empty"):
        bank(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"features must be a tensor \[N, 4\]"):
        bank.fit(torch.randn(3, 5))
    with pytest.raises(ValueError, match="coreset_ratio"):
        bank.fit(torch.randn(3, 4), coreset_ratio=0.0)
    bank.fit(torch.randn(3, 4))
    with pytest.raises(ValueError, match="k must be at most the bank size"):
        bank(torch.randn(2, 4), k=4)


def test_memory_bank_keeps_squared_norms_for_knn(monkeypatch):
    """fit() computes the bank's squared norms once; searches pass them to knn instead of
    recomputing them; loading a checkpoint recomputes them for the loaded rows."""
    import fastuad.nn.memory as nn_memory

    feats = torch.randn(40, 6)
    bank = MemoryBank(6, backend="torch").fit(feats)
    torch.testing.assert_close(bank.sq_norms, feats.pow(2).sum(1))
    assert "sq_norms" not in bank.state_dict()
    calls = []
    real = nn_memory.bank_sq_norms
    monkeypatch.setattr(nn_memory, "bank_sq_norms", lambda x: calls.append(x.shape) or real(x))
    seen = {}
    real_knn = nn_memory.knn
    monkeypatch.setattr(nn_memory, "knn", lambda *a, **kw: seen.update(kw) or real_knn(*a, **kw))
    q = torch.randn(5, 6)
    d, i = bank(q, k=2)
    assert calls == [] and seen["bank_sq_norms"] is bank.sq_norms
    torch.testing.assert_close(d, torch.cdist(q, feats).topk(2, largest=False).values, atol=1e-5, rtol=1e-5)
    other = MemoryBank(6, backend="torch")
    other.load_state_dict(MemoryBank(6).fit(feats[:7]).state_dict())
    torch.testing.assert_close(other.sq_norms, feats[:7].pow(2).sum(1))
