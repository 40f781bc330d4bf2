"""MSECosineLoss / MSECosineMap (feature-reconstruction loss and map) and the 2-D sine position code."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

import fastuad
from fastuad.nn import MSECosineLoss, MSECosineMap, sine_position_code_2d


def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 6, 8, 8), (2, 10, 4, 4)]
    a = [torch.randn(s, generator=g) for s in shapes]
    b = [x + 0.5 * torch.randn(x.shape, generator=g) for x in a]
    return a, b


def test_loss_is_summed_mse_plus_mean_cosine_distance_through_the_op():
    a, b = _pairs()
    want = sum(F.mse_loss(x, y) + (1 - F.cosine_similarity(x, y, dim=1)).mean() for x, y in zip(a, b))
    with fastuad.ops.trace() as calls:
        got = MSECosineLoss()(a, b)
    torch.testing.assert_close(got, want)
    assert [c.op for c in calls] == ["cosine_distance", "cosine_distance"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_map_is_squared_error_plus_cosine_resized_reduced_and_blurred_like_scipy(reduction):
    a, b = _pairs(1)
    with fastuad.ops.trace() as calls:
        got = MSECosineMap(out_size=32, reduction=reduction, blur_sigma=4)(a, b)
    assert [c.op for c in calls] == ["cosine_distance_map"]
    per_level = [
        F.interpolate(((x - y).pow(2).mean(1) + 1 - F.cosine_similarity(x, y, dim=1))[:, None], size=(32, 32), mode="bilinear", align_corners=False)
        for x, y in zip(a, b)
    ]
    combined = torch.stack(per_level).sum(0) / (len(per_level) if reduction == "mean" else 1)
    want = np.stack([gaussian_filter(m.double().numpy(), 4, mode="reflect", truncate=4.0) for m in combined[:, 0]])
    assert got.shape == (2, 1, 32, 32) and got.dtype == torch.float32
    np.testing.assert_allclose(got[:, 0].numpy(), want, atol=1e-5, rtol=1e-5)
    unblurred = MSECosineMap(out_size=32, reduction=reduction)(a, b)
    torch.testing.assert_close(unblurred, combined, atol=1e-5, rtol=1e-5)


def test_map_and_loss_reject_bad_input():
    a, b = _pairs()
    with pytest.raises(ValueError, match="reduction must be one of .*'mean', 'sum'"):
        MSECosineMap(32, reduction="prod")
    with pytest.raises(ValueError, match="non-empty lists of equal length"):
        MSECosineMap(32)(a, b[:1])
    with pytest.raises(ValueError, match=r"level 1: .* equal shape"):
        MSECosineLoss()(a, [b[0], b[1][:, :3]])


def test_sine_position_code_2d():
    code = sine_position_code_2d(3, 5, 8)
    assert code.shape == (3, 5, 8) and code.dtype == torch.float32
    # channels 0..3 encode the column: pairs (sin, cos) at frequencies 1 and 10000**(-2/4)
    f1 = 10000 ** (-2 / 4)
    for i, j in [(0, 0), (2, 4), (1, 3)]:
        want = [math.sin(j), math.cos(j), math.sin(j * f1), math.cos(j * f1),
                math.sin(i), math.cos(i), math.sin(i * f1), math.cos(i * f1)]
        torch.testing.assert_close(code[i, j], torch.tensor(want), atol=1e-6, rtol=0)
    assert len({tuple(code[i, j].tolist()) for i in range(3) for j in range(5)}) == 15  # every position distinct
    with pytest.raises(ValueError, match="dim must be a multiple of 4"):
        sine_position_code_2d(3, 5, 6)
    with pytest.raises(ValueError, match="height must be a positive int"):
        sine_position_code_2d(0, 5, 8)
