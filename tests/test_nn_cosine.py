"""fastuad.nn module forms of the cosine ops."""

import pytest
import torch

from conftest import TRITON_DEVICE, hard_mining_easy_mask
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


def test_hard_mining_loss_weights_easy_pixels_and_their_gradient():
    fa, fb = _features(TRITON_DEVICE)
    fb = [b.requires_grad_() for b in fb]
    loss = CosineDistanceLoss(backend="triton", hard_quantile=0.75, easy_weight=0.1)(fa, fb)
    expected, easy_masks = 0.0, []
    for a, b in zip(fa, fb):
        easy = hard_mining_easy_mask(cosine_distance_reference(a, b.detach()), 0.75)
        w = torch.where(easy, 0.1, 1.0)
        easy_masks.append(easy)
        expected = expected + (cosine_distance_reference(a, b) * w).sum() / w.sum()
        assert 0.2 <= float((~easy).float().mean()) <= 0.3  # about a quarter of the pixels is hard
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    # The gradient of an easy pixel is 0.1 times what the same pixel gets with weight 1.
    loss.backward()
    grads = [b.grad.clone() for b in fb]
    for b in fb:
        b.grad = None
    sum(cosine_distance_reference(a, b).sum() / torch.where(e, 0.1, 1.0).sum() for a, b, e in zip(fa, fb, easy_masks)).backward()
    for g, b, e in zip(grads, fb, easy_masks):
        easy = e[:, None].expand_as(g)
        torch.testing.assert_close(g[easy], 0.1 * b.grad[easy], atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(g[~easy], b.grad[~easy], atol=1e-7, rtol=1e-4)
    plain = CosineDistanceLoss(backend="triton", hard_quantile=None)(fa, fb)
    torch.testing.assert_close(plain, sum(cosine_distance_reference(a, b).mean() for a, b in zip(fa, fb)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"hard_quantile": 1.0}, "hard_quantile"), ({"hard_quantile": 0}, "hard_quantile"), ({"hard_quantile": True}, "hard_quantile"),
    ({"hard_quantile": 0.9, "easy_weight": 1.5}, "easy_weight"), ({"easy_weight": -0.1}, "easy_weight"),
])
def test_hard_mining_loss_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CosineDistanceLoss(**kwargs)


def _grouped_features():
    """Four images; the last two (group 1) far from their targets, like synthetic anomalies beside clean images."""
    g = torch.Generator().manual_seed(1)
    fa = [torch.randn(4, c, s, s, generator=g) for c, s in ((6, 12), (10, 6))]
    fb = [a + torch.tensor([0.2, 0.2, 3.0, 3.0])[:, None, None, None] * torch.randn(a.shape, generator=g) for a in fa]
    return fa, fb, torch.tensor([0, 0, 1, 1])


def test_hard_mining_per_group_mines_each_group_on_its_own():
    fa, fb, groups = _grouped_features()
    loss_fn = CosineDistanceLoss(hard_quantile=0.9, easy_weight=0.1)
    expected = 0.0
    for a, b in zip(fa, fb):
        for g in (0, 1):
            d = cosine_distance_reference(a[groups == g], b[groups == g])
            w = torch.where(hard_mining_easy_mask(d, 0.9), 0.1, 1.0)
            expected = expected + (d * w).sum() / w.sum() * 0.5  # each group holds half of the images
    torch.testing.assert_close(loss_fn(fa, fb, groups=groups), expected, atol=1e-6, rtol=1e-6)
    # Shared mining gives the far group every hard point, so the near group's pixels all weigh 0.1.
    d0 = cosine_distance_reference(fa[0], fb[0])
    assert not (~hard_mining_easy_mask(d0, 0.9))[:2].any()
    assert not torch.allclose(loss_fn(fa, fb), loss_fn(fa, fb, groups=groups))
    # One group is the shared mining; the plain mean does not depend on groups.
    torch.testing.assert_close(loss_fn(fa, fb, groups=torch.zeros(4, dtype=torch.long)), loss_fn(fa, fb), atol=1e-6, rtol=1e-6)
    plain = CosineDistanceLoss(hard_quantile=None)
    torch.testing.assert_close(plain(fa, fb, groups=groups), plain(fa, fb), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("groups", [torch.tensor([0, 1]), torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([True, False, True, False])])
def test_hard_mining_per_group_rejects_bad_groups(groups):
    fa, fb, _ = _grouped_features()
    with pytest.raises(ValueError, match=r"groups must be an integer tensor of shape \[4\]"):
        CosineDistanceLoss(hard_quantile=0.9)(fa, fb, groups=groups)
    with pytest.raises(ValueError, match="groups must be"):
        CosineDistanceLoss(hard_quantile=None)(fa, fb, groups=groups)
