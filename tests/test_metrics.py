"""Exact metrics: against scikit-learn, the MVTec AD AUPRO code, and a slow AUPRO from the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from fastuad.metrics import (
    METRIC_NAMES,
    aupro,
    aupro_reference,
    auroc,
    average_precision,
    evaluate,
    evaluate_per_class,
    f1_max,
    label_regions,
)
from conftest import requires_cuda

TOL = 1e-6


def sklearn_f1_max(y, s) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.nanmax(f1))


def random_maps(rng: np.random.Generator, n: int, h: int, w: int, levels: int | None = None):
    """Masks with a few blobs (some touching diagonally) and maps that are higher inside them."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue  # good images
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    maps = rng.random((n, h, w)) + 0.7 * masks * rng.random((n, h, w))
    if levels:  # many ties
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


def slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """From the definition: for every threshold, FPR and the mean per-region overlap; then integrate."""
    regions = []
    for i in range(len(masks)):
        labeled, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labeled == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([above[i][r].mean() for i, r in regions])
        points.append((float(fpr), float(pro)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < fpr_limit:  # the segment crossing the limit: interpolate linearly at the limit
            y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_at) * (fpr_limit - x0)
    return area / fpr_limit


# --------------------------------------------------------------------------------------------
# Image-level curves against scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ties", "float32", "float64", "negative"])
def test_image_metrics_equal_sklearn(kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    for _ in range(25):
        n = int(rng.integers(2, 300))
        y = rng.integers(0, 2, n)
        y[:2] = (0, 1)
        if kind == "ties":
            s = rng.integers(0, 6, n).astype(np.float32)
        elif kind == "float32":
            s = (rng.random(n) + 0.3 * y).astype(np.float32)
        elif kind == "float64":  # not representable in float32: the argsort path
            s = rng.random(n) + 0.3 * y + 1e-12
        else:  # negatives, and -0.0 tied with +0.0
            s = rng.integers(-3, 3, n).astype(np.float32)
            s[s == 0] = np.where(rng.random(int((s == 0).sum())) < 0.5, -0.0, 0.0)
        assert abs(auroc(y, s) - roc_auc_score(y, s)) < TOL
        assert abs(average_precision(y, s) - average_precision_score(y, s)) < TOL
        assert abs(f1_max(y, s) - sklearn_f1_max(y, s)) < TOL


def test_known_values_and_undefined_metrics():
    y = [0, 0, 1, 1]
    assert auroc(y, [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auroc([1, 0], [1.0, 0.0]) == 1.0
    assert average_precision(y, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert f1_max(y, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)
    assert math.isnan(auroc([0, 0], [0.1, 0.2]))
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))
    assert math.isnan(f1_max([0, 0], [0.1, 0.2]))


def test_torch_numpy_and_dtypes_agree():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    s = rng.integers(0, 10, 100).astype(np.float32)
    expected = roc_auc_score(y, s)
    for yy, ss in [
        (torch.from_numpy(y), torch.from_numpy(s)),
        (torch.from_numpy(y).bool(), torch.from_numpy(s).half()),
        (y.astype(np.float64), s.astype(np.float64)),
        (y.tolist(), s.astype(np.int64)),
    ]:
        assert abs(auroc(yy, ss) - expected) < TOL


# --------------------------------------------------------------------------------------------
# Pixel metrics and AUPRO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 10])
def test_pixel_metrics_equal_sklearn(levels):
    rng = np.random.default_rng(2 + (levels or 0))
    masks, maps = random_maps(rng, 9, 24, 20, levels)
    labels = masks.reshape(9, -1).any(1).astype(np.int64)
    scores = maps.reshape(9, -1).max(1)
    out = evaluate(labels, scores, masks, maps)
    assert list(out) == list(METRIC_NAMES)
    flat_m, flat_a = masks.ravel(), maps.ravel()
    assert abs(out["p_auroc"] - roc_auc_score(flat_m, flat_a)) < TOL
    assert abs(out["p_ap"] - average_precision_score(flat_m, flat_a)) < TOL
    assert abs(out["p_f1max"] - sklearn_f1_max(flat_m, flat_a)) < TOL
    assert abs(out["i_auroc"] - roc_auc_score(labels, scores)) < TOL
    assert abs(out["i_ap"] - average_precision_score(labels, scores)) < TOL
    assert abs(out["i_f1max"] - sklearn_f1_max(labels, scores)) < TOL


@pytest.mark.parametrize("seed", range(6))
def test_aupro_equals_definition_and_mvtec_code(seed):
    rng = np.random.default_rng(10 + seed)
    levels = [None, 8, 40][seed % 3]  # distinct scores, heavy ties, some ties
    masks, maps = random_maps(rng, 4, 12, 14, levels)
    limit = [0.3, 0.05, 1.0][seed % 3 if seed < 3 else 0]
    fast = aupro(masks, maps, fpr_limit=limit)
    assert abs(fast - slow_aupro(masks, maps, limit)) < TOL
    assert abs(fast - aupro_reference(masks, maps, limit)) < TOL


def test_aupro_matches_mvtec_code_on_larger_maps():
    rng = np.random.default_rng(7)
    masks, maps = random_maps(rng, 12, 48, 48, levels=200)
    assert abs(aupro(masks, maps) - aupro_reference(masks, maps)) < TOL


def test_aupro_hand_example_and_regions():
    # One region of two pixels (scores 0.9 and 0.1); normal pixels 0.8 and 0.2.
    masks = np.array([[[1, 1, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.1, 0.8, 0.2]]], dtype=np.float32)
    # Curve (0,0) (0,.5) (.5,.5) (1,.5) (1,1): overlap is 0.5 up to FPR 1.
    assert aupro(masks, maps) == pytest.approx(0.5)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5)
    # Regions: 8-connected inside an image, never across images.
    m = torch.zeros(2, 5, 5, dtype=torch.bool)
    m[0, 0, 0] = m[0, 1, 1] = True  # diagonal neighbours: one region
    m[0, 4, 4] = True
    m[1, 0, 0] = True  # same place in the next image: its own region
    labels, sizes = label_regions(m)
    assert sizes.tolist() == [46, 2, 1, 1]
    assert labels[0, 0, 0] == labels[0, 1, 1] != labels[0, 4, 4]
    assert labels[1, 0, 0] not in (labels[0, 0, 0], labels[0, 4, 4])


def test_region_size_weights_each_region_equally():
    # A big region fully detected and a small one missed: PRO is 0.5 while pixel recall is ~0.97.
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, :6, :6] = True
    masks[0, 9, 9] = True
    maps = np.where(masks, 1.0, 0.0).astype(np.float32)
    maps[0, 9, 9] = 0.0
    maps[0, 8, 0] = 0.5  # one normal pixel above the missed one
    assert aupro(masks, maps) == pytest.approx(slow_aupro(masks, maps))
    assert aupro(masks, maps, fpr_limit=0.01) == pytest.approx(0.5)


def test_evaluate_shapes_and_inputs():
    rng = np.random.default_rng(3)
    masks, maps = random_maps(rng, 6, 10, 10)
    labels = masks.reshape(6, -1).any(1)
    scores = maps.reshape(6, -1).max(1)
    a = evaluate(labels, scores, masks, maps)
    t = torch.from_numpy
    b = evaluate(t(labels), t(scores), t(masks)[:, None].float(), t(maps)[:, None])
    assert a == b
    only_images = evaluate(labels, scores)
    assert only_images["i_auroc"] == a["i_auroc"] and math.isnan(only_images["aupro"])
    good = evaluate([0, 1], [0.1, 0.2], np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    assert math.isnan(good["p_auroc"]) and math.isnan(good["aupro"]) and good["i_auroc"] == 1.0


def test_bad_inputs_name_the_argument():
    m = np.zeros((2, 4, 4))
    a = np.zeros((2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="masks must be binary"):
        evaluate([0, 1], [0.0, 1.0], m + 0.5, a)
    with pytest.raises(ValueError, match="labels must be binary"):
        evaluate([0, 2], [0.0, 1.0])
    with pytest.raises(ValueError, match="scores must be finite"):
        evaluate([0, 1], [0.0, float("nan")])
    with pytest.raises(ValueError, match="maps must be finite"):
        evaluate([0, 1], [0.0, 1.0], m, a + np.inf)
    with pytest.raises(ValueError, match="same number of elements"):
        evaluate([0, 1, 1], [0.0, 1.0])
    with pytest.raises(ValueError, match="masks and maps must have the same shape"):
        evaluate([0, 1], [0.0, 1.0], m, a[:, :3])
    with pytest.raises(ValueError, match="one map per image"):
        evaluate([0, 1, 1], [0.0, 1.0, 0.5], m, a)
    with pytest.raises(ValueError, match=r"masks must have shape \[N, H, W\]"):
        evaluate([0, 1], [0.0, 1.0], m[0], a[0])
    with pytest.raises(ValueError, match="given together"):
        evaluate([0, 1], [0.0, 1.0], m, None)
    with pytest.raises(ValueError, match="fpr_limit"):
        evaluate([0, 1], [0.0, 1.0], fpr_limit=0)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor or numpy array"):
        evaluate([0, 1], "0.1 0.2")


def test_evaluate_per_class_and_mean():
    rng = np.random.default_rng(4)
    masks, maps = random_maps(rng, 12, 10, 10)
    labels = masks.reshape(12, -1).any(1).astype(np.int64)
    scores = maps.reshape(12, -1).max(1)
    names = [["b", "a", "c"][(i // 2) % 3] for i in range(12)]  # class c has no good image
    out = evaluate_per_class(names, labels, scores, masks, maps)
    assert list(out["per_class"]) == ["a", "b", "c"]
    for cls in "abc":
        idx = [i for i, c in enumerate(names) if c == cls]
        assert out["per_class"][cls] == evaluate(labels[idx], scores[idx], masks[idx], maps[idx])
    assert math.isnan(out["per_class"]["c"]["i_auroc"])
    for key in METRIC_NAMES:
        values = [out["per_class"][c][key] for c in "abc" if not math.isnan(out["per_class"][c][key])]
        assert out["mean"][key] == pytest.approx(sum(values) / len(values))
    with pytest.raises(ValueError, match="one entry per image"):
        evaluate_per_class(names[:-1], labels, scores, masks, maps)


@requires_cuda
def test_cuda_equals_cpu():
    rng = np.random.default_rng(5)
    masks, maps = random_maps(rng, 10, 32, 32, levels=50)
    labels = torch.from_numpy(masks.reshape(10, -1).any(1))
    scores = torch.from_numpy(maps.reshape(10, -1).max(1))
    cpu = evaluate(labels, scores, torch.from_numpy(masks), torch.from_numpy(maps))
    gpu = evaluate(labels.cuda(), scores.cuda(), torch.from_numpy(masks).cuda(), torch.from_numpy(maps).cuda())
    for key in METRIC_NAMES:
        assert abs(cpu[key] - gpu[key]) < 1e-12, key
