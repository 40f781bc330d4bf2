"""Exact image and pixel metrics for anomaly detection: AUROC, AP, F1-max and AUPRO.

No histogram binning: every distinct score is a threshold, ties are grouped exactly as
scikit-learn groups them, so ``i_auroc``/``p_auroc`` equal ``sklearn.metrics.roc_auc_score`` and
``i_ap``/``p_ap`` equal ``average_precision_score`` (to rounding, 1e-12 in practice).

How it is fast. Each curve comes from **one sort** of all samples (all pixels of all maps for
the pixel metrics) followed by cumulative sums:

* every score is mapped to an order-reversing 32-bit integer and packed with a 32-bit payload
  (the image label, or the id of the ground-truth region a pixel belongs to) into one int64
  key, so a plain value sort (``torch.sort`` on the GPU, numpy's SIMD sort on the CPU, both
  exact) orders samples by descending score and carries each one's payload along;
* tie groups are the runs of equal score bits; cumulative true positives, false positives and
  per-region overlap weights read at the end of each run give the exact curves.

The pixel AUROC, AP, F1-max and AUPRO share that single sort. Everything runs in torch on the
device of the inputs (CUDA tensors stay on the GPU); only the connected-component labelling of
the ground truth (``scipy.ndimage.label``, 8-connected) runs on the CPU.

AUPRO follows the MVTec AD evaluation code: the curve (FPR over normal pixels, mean per-region
overlap over 8-connected ground-truth regions) with a point at (0, 0), trapezoids up to
``fpr_limit`` with linear interpolation at the limit, divided by ``fpr_limit``.
:func:`aupro_reference` is a direct numpy transcription of that code (loop over regions,
``np.argsort``) kept as the readable reference.

Undefined metrics are ``nan``: AUROC without both classes, AP/F1-max without positives, AUPRO
without anomalous or without normal pixels.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "METRIC_NAMES",
    "evaluate",
    "evaluate_per_class",
    "auroc",
    "average_precision",
    "f1_max",
    "aupro",
    "aupro_reference",
    "label_regions",
]

METRIC_NAMES = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro")
DEFAULT_FPR_LIMIT = 0.3
_PAYLOAD_BITS = 32
_PAYLOAD_SHIFT = 1 << _PAYLOAD_BITS
_MAX_PAYLOAD = (1 << 31) - 1


# --------------------------------------------------------------------------------------------
# Input conversion and checks
# --------------------------------------------------------------------------------------------


def _as_tensor(name: str, x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (list, tuple)):
        return torch.as_tensor(np.asarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _binary(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as a bool tensor; its values must be 0/1 (or bool)."""
    if t.dtype == torch.bool:
        return t
    if t.is_complex():
        raise TypeError(f"{name} must hold 0/1 values (bool, integer or float), got {t.dtype}")
    bad = (t != 0) & (t != 1)
    if bool(bad.any()):
        value = t[bad][0].item()
        raise ValueError(f"{name} must be binary (values 0 and 1 only), found {value!r}")
    return t != 0


def _scores(name: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must be a real-valued tensor, got {t.dtype}")
        t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return t


def _pixel_shape(name: str, t: torch.Tensor) -> torch.Tensor:
    """``[N,H,W]`` or ``[N,1,H,W]`` -> ``[N,H,W]``."""
    if t.dim() == 4 and t.shape[1] == 1:
        return t[:, 0]
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape [N, H, W] or [N, 1, H, W], got {tuple(t.shape)}")
    return t


def _common_device(*tensors: torch.Tensor | None) -> torch.device:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# One sort: descending scores, tie groups, payload carried along
# --------------------------------------------------------------------------------------------


def _descending_key(scores: torch.Tensor) -> torch.Tensor:
    """int64 ``s`` with ``s`` ascending <=> score descending (ties <=> equal ``s``), float32 scores."""
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    return bits.bitwise_not_().to(torch.int64)  # reverse the order


def _sort_values_(keys: torch.Tensor) -> torch.Tensor:
    """Ascending sort of an int64 tensor's values, in place on CPU (exact on every backend)."""
    if keys.device.type == "cpu":
        # numpy's SIMD sort is several times faster than torch.sort on CPU and gives the same values.
        keys.numpy().sort()
        return keys
    return torch.sort(keys).values


def _ranked(scores: torch.Tensor, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort by descending score; returns ``(payload in that order, index of each tie group's last)``.

    ``payload`` holds non-negative ints below 2**31. Scores that float32 represents exactly are
    packed with the payload into one int64 key (score in the high 32 bits) and value-sorted; other
    float64 scores fall back to ``torch.sort`` with indices (the same result, slower).
    """
    scores = scores.reshape(-1)
    payload = payload.reshape(-1)
    n = scores.numel()
    exact32 = scores.dtype != torch.float64 or bool((scores.to(torch.float32).to(torch.float64) == scores).all())
    if exact32:
        key = _descending_key(scores).mul_(_PAYLOAD_SHIFT).add_(payload)
        key = _sort_values_(key)
        high = key >> _PAYLOAD_BITS  # arithmetic shift: the score part
        change = high[1:] != high[:-1]
        del high
        payload_sorted = key.bitwise_and_(_PAYLOAD_SHIFT - 1)
    else:
        values, order = torch.sort(scores, descending=True, stable=True)
        payload_sorted = payload[order].to(torch.int64)
        change = values[1:] != values[:-1]
    last = torch.cat([torch.nonzero(change).reshape(-1), torch.tensor([n - 1], device=scores.device)])
    return payload_sorted, last


def _counts(positive_sorted: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative true and false positives (int64) at the end of each tie group."""
    tp = torch.cumsum(positive_sorted, 0, dtype=torch.int64)[last]
    fp = last + 1 - tp
    return tp, fp


# --------------------------------------------------------------------------------------------
# Curve summaries (from cumulative counts at the tie-group ends)
# --------------------------------------------------------------------------------------------


def _auroc_from_counts(tp: torch.Tensor, fp: torch.Tensor) -> float:
    """Exact trapezoid area under the ROC curve, in integers: sum dFP * (TP_k + TP_{k-1}) / 2PN."""
    pos, neg = int(tp[-1]), int(fp[-1])
    if pos == 0 or neg == 0:
        return math.nan
    zero = tp.new_zeros(1)
    d_fp = torch.diff(fp, prepend=zero)
    tp_prev = torch.cat([zero, tp[:-1]])
    twice_area = int((d_fp * (tp + tp_prev)).sum())
    return twice_area / (2 * pos * neg)


def _ap_from_counts(tp: torch.Tensor, fp: torch.Tensor) -> float:
    """scikit-learn's average precision: sum over thresholds of (R_k - R_{k-1}) * P_k."""
    pos = int(tp[-1])
    if pos == 0:
        return math.nan
    tp64 = tp.to(torch.float64)
    d_tp = torch.diff(tp64, prepend=tp64.new_zeros(1))
    precision = tp64 / (tp64 + fp.to(torch.float64))
    return float((d_tp * precision).sum()) / pos


def _f1max_from_counts(tp: torch.Tensor, fp: torch.Tensor) -> float:
    """max over thresholds of 2PR/(P+R) = 2TP / (TP + FP + #positives)."""
    pos = int(tp[-1])
    if pos == 0:
        return math.nan
    tp64 = tp.to(torch.float64)
    return float((2 * tp64 / (tp64 + fp.to(torch.float64) + pos)).max())


def _trapezoid_to_limit(x: torch.Tensor, y: torch.Tensor, limit: float) -> float:
    """MVTec AD's ``trapezoid(x, y, x_max)``: area up to ``limit``, linear interpolation at it.

    ``x`` is non-decreasing and starts at 0 with ``x[-1] >= limit``.
    """
    inside = int(torch.searchsorted(x, torch.tensor([limit], dtype=x.dtype, device=x.device), right=True))
    xs, ys = x[:inside], y[:inside]
    area = float((0.5 * (ys[1:] + ys[:-1]) * (xs[1:] - xs[:-1])).sum())
    x0, y0 = float(x[inside - 1]), float(y[inside - 1])
    if x0 != limit and inside < x.numel():
        x1, y1 = float(x[inside]), float(y[inside])
        y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y_at + y0) * (limit - x0)
    return area


def _check_fpr_limit(fpr_limit: float) -> float:
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float)) or not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
    return float(fpr_limit)


# --------------------------------------------------------------------------------------------
# Ground-truth regions
# --------------------------------------------------------------------------------------------


def label_regions(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-connected regions of each ``[H, W]`` mask of a bool ``masks [N, H, W]``, numbered globally.

    Returns ``(labels int32 [N, H, W] on masks' device, sizes int64 [R + 1] on the CPU)``: 0 is
    background, regions are ``1..R`` and never span two images. Only images with a defect go
    through ``scipy.ndimage.label`` (on the CPU).
    """
    from scipy import ndimage  # noqa: PLC0415

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within an image, nothing across images
    labels = torch.zeros(masks.shape, dtype=torch.int32, device=masks.device)
    defective = torch.nonzero(masks.reshape(masks.shape[0], -1).any(1)).reshape(-1)
    if defective.numel() == 0:
        return labels, torch.tensor([masks.numel()], dtype=torch.int64)
    sub, n = ndimage.label(masks[defective].cpu().numpy(), structure=structure)
    sub = torch.from_numpy(sub.astype(np.int32, copy=False))
    sizes = torch.bincount(sub.reshape(-1), minlength=n + 1)
    sizes[0] = masks.numel() - int(sizes[1:].sum())  # background pixels of all images
    labels[defective] = sub.to(masks.device)
    return labels, sizes


# --------------------------------------------------------------------------------------------
# Public metrics
# --------------------------------------------------------------------------------------------


def _image_counts(labels: Any, scores: Any) -> tuple[torch.Tensor, torch.Tensor]:
    y = _binary("labels", _as_tensor("labels", labels)).reshape(-1)
    s = _scores("scores", _as_tensor("scores", scores)).reshape(-1)
    if y.numel() != s.numel():
        raise ValueError(f"labels and scores must have the same number of elements, got {y.numel()} and {s.numel()}")
    if y.numel() == 0:
        raise ValueError("labels and scores must not be empty")
    y = y.to(s.device)
    positive, last = _ranked(s, y)
    return _counts(positive, last)


def auroc(target: Any, scores: Any) -> float:
    """Area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score`` (ties included)."""
    return _auroc_from_counts(*_image_counts(target, scores))


def average_precision(target: Any, scores: Any) -> float:
    """Average precision, equal to ``sklearn.metrics.average_precision_score``."""
    return _ap_from_counts(*_image_counts(target, scores))


def f1_max(target: Any, scores: Any) -> float:
    """The best F1 score over all thresholds of the precision-recall curve."""
    return _f1max_from_counts(*_image_counts(target, scores))


def _pixel_metrics(masks: torch.Tensor, maps: torch.Tensor, fpr_limit: float) -> dict[str, float]:
    """p_auroc, p_ap, p_f1max and aupro from one sort of all pixels."""
    region, sizes = label_regions(masks)
    if sizes.numel() > _MAX_PAYLOAD:
        raise ValueError(f"masks have {sizes.numel() - 1} regions; at most {_MAX_PAYLOAD - 1} are supported")
    region_sorted, last = _ranked(maps, region)
    del region
    tp, fp = _counts(region_sorted > 0, last)
    out = {"p_auroc": _auroc_from_counts(tp, fp), "p_ap": _ap_from_counts(tp, fp), "p_f1max": _f1max_from_counts(tp, fp)}

    n_regions, n_normal = sizes.numel() - 1, int(fp[-1])
    if n_regions == 0 or n_normal == 0:
        out["aupro"] = math.nan
        return out
    fpr = fp.to(torch.float64) / n_normal
    del tp, fp
    # Only the curve up to the first point past the limit matters: cut the pixels there.
    limit = torch.tensor([fpr_limit], dtype=torch.float64, device=fpr.device)
    stop = min(int(torch.searchsorted(fpr, limit, right=True)), fpr.numel() - 1)
    fpr, last = fpr[: stop + 1], last[: stop + 1]
    inv_size = 1.0 / sizes.to(torch.float64).clamp_min(1)
    inv_size[0] = 0.0  # normal pixels add no overlap
    weights = inv_size.to(region_sorted.device)[region_sorted[: int(last[-1]) + 1]]
    del region_sorted
    overlap = torch.cumsum(weights, 0)[last]
    zero = fpr.new_zeros(1)
    pro = torch.cat([zero, (overlap / n_regions).clamp_(0.0, 1.0)])
    out["aupro"] = _trapezoid_to_limit(torch.cat([zero, fpr]), pro, fpr_limit) / fpr_limit
    return out


def _prepare_pixels(masks: Any, maps: Any) -> tuple[torch.Tensor, torch.Tensor]:
    m = _pixel_shape("masks", _as_tensor("masks", masks))
    a = _pixel_shape("maps", _as_tensor("maps", maps))
    if m.shape != a.shape:
        raise ValueError(f"masks and maps must have the same shape, got {tuple(m.shape)} and {tuple(a.shape)}")
    if m.numel() == 0:
        raise ValueError("masks and maps must not be empty")
    device = _common_device(m, a)
    return _binary("masks", m).to(device), _scores("maps", a).to(device)


def aupro(masks: Any, maps: Any, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD AUPRO)."""
    m, a = _prepare_pixels(masks, maps)
    return _pixel_metrics(m, a, _check_fpr_limit(fpr_limit))["aupro"]


def evaluate(
    labels: Any, scores: Any, masks: Any = None, maps: Any = None, fpr_limit: float = DEFAULT_FPR_LIMIT
) -> dict[str, float]:
    """All metrics of one test set: ``i_auroc, i_ap, i_f1max, p_auroc, p_ap, p_f1max, aupro``.

    ``labels [N]`` (0 good, 1 anomalous) and ``scores [N]`` are image-level; ``masks`` (binary)
    and ``maps`` (float) are ``[N, H, W]`` or ``[N, 1, H, W]``. Torch tensors or numpy arrays;
    CUDA tensors are evaluated on their GPU. Without ``masks``/``maps`` the pixel metrics are nan.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    tp, fp = _image_counts(labels, scores)
    out = {"i_auroc": _auroc_from_counts(tp, fp), "i_ap": _ap_from_counts(tp, fp), "i_f1max": _f1max_from_counts(tp, fp)}
    if (masks is None) != (maps is None):
        raise ValueError("masks and maps must be given together (or both left out)")
    if masks is None:
        out.update({k: math.nan for k in ("p_auroc", "p_ap", "p_f1max", "aupro")})
        return out
    m, a = _prepare_pixels(masks, maps)
    n_images = int(tp[-1] + fp[-1])
    if m.shape[0] != n_images:
        raise ValueError(f"masks and maps must have one map per image: {m.shape[0]} maps for {n_images} labels")
    out.update(_pixel_metrics(m, a, fpr_limit))
    return {k: out[k] for k in METRIC_NAMES}


def evaluate_per_class(
    class_names: Sequence[str],
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
) -> dict[str, dict]:
    """:func:`evaluate` for each class and their mean: ``{"per_class": {cls: m}, "mean": m}``.

    ``class_names`` has one entry per image. The mean over classes ignores nan entries (a class
    whose metric is undefined); it is nan only when every class's value is.
    """
    names = [str(c) for c in (class_names.tolist() if hasattr(class_names, "tolist") else class_names)]
    n = len(names)
    y = _as_tensor("labels", labels).reshape(-1)
    s = _as_tensor("scores", scores).reshape(-1)
    if y.numel() != n or s.numel() != n:
        raise ValueError(f"class_names, labels and scores must have one entry per image, got {n}, {y.numel()}, {s.numel()}")
    if (masks is None) != (maps is None):
        raise ValueError("masks and maps must be given together (or both left out)")
    m = a = None
    if masks is not None:
        m = _pixel_shape("masks", _as_tensor("masks", masks))
        a = _pixel_shape("maps", _as_tensor("maps", maps))
        if m.shape[0] != n or a.shape[0] != n:
            raise ValueError(f"masks and maps must have one map per image ({n}), got {m.shape[0]} and {a.shape[0]}")
    per_class: dict[str, dict[str, float]] = {}
    for cls in sorted(set(names)):
        idx = torch.tensor([i for i, c in enumerate(names) if c == cls], dtype=torch.int64)
        sub = (lambda t: None if t is None else t[idx.to(t.device)])  # noqa: E731
        per_class[cls] = evaluate(sub(y), sub(s), sub(m), sub(a), fpr_limit=fpr_limit)
    mean = {}
    for key in METRIC_NAMES:
        values = [r[key] for r in per_class.values() if not math.isnan(r[key])]
        mean[key] = sum(values) / len(values) if values else math.nan
    return {"per_class": per_class, "mean": mean}


# --------------------------------------------------------------------------------------------
# Reference (MVTec AD evaluation code, transcribed to numpy)
# --------------------------------------------------------------------------------------------


def aupro_reference(masks: Any, maps: Any, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """The MVTec AD evaluation code's AUPRO (``compute_pro`` + ``trapezoid``), in numpy float64.

    A loop over images and their 8-connected regions fills per-pixel FPR and overlap increments;
    one ``np.argsort`` orders the pixels by descending score; cumulative sums read at the last
    pixel of each run of equal scores give the curve, with (0, 0) and (1, 1) appended; the area
    up to ``fpr_limit`` (linear interpolation at the limit) is divided by ``fpr_limit``.
    """
    from scipy import ndimage  # noqa: PLC0415

    m = np.asarray(masks.cpu() if isinstance(masks, torch.Tensor) else masks)
    a = np.asarray(maps.cpu() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
    m = m.reshape(-1, *m.shape[-2:]).astype(bool)
    a = a.reshape(m.shape)
    fp_changes = np.zeros(m.shape, dtype=np.float64)
    pro_changes = np.zeros(m.shape, dtype=np.float64)
    n_ok = n_regions = 0
    for i, gt in enumerate(m):
        labeled, n = ndimage.label(gt, structure=np.ones((3, 3), dtype=int))
        n_regions += n
        ok = labeled == 0
        n_ok += int(ok.sum())
        fp_changes[i][ok] = 1.0
        for k in range(1, n + 1):
            region = labeled == k
            pro_changes[i][region] = 1.0 / region.sum()
    if n_regions == 0 or n_ok == 0:
        return math.nan
    order = np.argsort(a.ravel(), kind="stable")[::-1]
    scores = a.ravel()[order]
    fprs = np.cumsum(fp_changes.ravel()[order]) / n_ok
    pros = np.cumsum(pro_changes.ravel()[order]) / n_regions
    keep = np.append(np.diff(scores) != 0, True)
    fprs = np.concatenate([[0.0], np.clip(fprs[keep], 0, 1), [1.0]])
    pros = np.concatenate([[0.0], np.clip(pros[keep], 0, 1), [1.0]])

    x_max = fpr_limit
    correction = 0.0
    if x_max not in fprs:
        ins = int(np.searchsorted(fprs, x_max, side="right"))
        y_interp = pros[ins - 1] + (pros[ins] - pros[ins - 1]) * (x_max - fprs[ins - 1]) / (fprs[ins] - fprs[ins - 1])
        correction = 0.5 * (y_interp + pros[ins - 1]) * (x_max - fprs[ins - 1])
    keep = fprs <= x_max
    x, y = fprs[keep], pros[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / x_max
