"""fastuad.nn module forms of the cosine ops."""

import pytest
import torch

from conftest import TRITON_DEVICE
from fastuad.nn import CosineDistanceLoss, CosineDistanceMap
from fastuad.ops import cosine_distance_map_reference, cosine_distance_reference


def _features(device="cpu"):
    g = torch.Generator().manual_seed(0)
    fa = [torch.randn(2, c, s, s, generator=g).to(device) for c, s in ((6, 12), (10, 6))]
    fb = [a + 0.4 * torch.randn(a.shape, generator=g).to(device) for a in fa]
    return fa, fb


def test_map_module_caches_gaussian_and_matches_reference():
    head = CosineDistanceMap(out_size=24, reduction="sum", blur_sigma=2.0, backend="triton").to(TRITON_DEVICE)
    assert head.gaussian.numel() == 2 * 8 + 1 and head.gaussian.device.type == TRITON_DEVICE
    assert "gaussian" not in head.state_dict()  # derived from blur_sigma, not a checkpointed weight
    fa, fb = _features(TRITON_DEVICE)
    torch.testing.assert_close(head(fa, fb), cosine_distance_map_reference(fa, fb, 24, "sum", 2.0), atol=2e-5, rtol=1e-5)


def test_map_module_rejects_bad_config():
    with pytest.raises(ValueError, match="reduction"):
        CosineDistanceMap(reduction="median")
    with pytest.raises(ValueError, match="blur_sigma"):
        CosineDistanceMap(blur_sigma=-2)
    with pytest.raises(ValueError, match="backend"):
        CosineDistanceMap(backend="fast")


def test_loss_module_sums_scale_means_and_trains():
    fa, fb = _features(TRITON_DEVICE)
    fb = [b.requires_grad_() for b in fb]
    loss = CosineDistanceLoss(backend="triton")(fa, fb)
    expected = sum(cosine_distance_reference(a, b).mean() for a, b in zip(fa, fb))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in fb)
