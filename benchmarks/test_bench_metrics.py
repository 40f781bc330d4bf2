"""Benchmark of the exact metrics: ``metrics`` (fastuad.metrics.evaluate on an MVTec-sized test set).

Workload: ``N`` anomaly maps of ``S x S`` with their binary masks (elliptic defects on about two
thirds of the images, the others good), image labels and scores (max of each map); all seven
metrics ``i_auroc, i_ap, i_f1max, p_auroc, p_ap, p_f1max, aupro``. Full size is the MVTec AD
test set: 1,725 maps of 256x256 (113 M pixels).

Backends, in this order within the case:

* ``reference``: scikit-learn (``roc_auc_score``, ``average_precision_score``,
  ``precision_recall_curve`` for F1-max) on the image scores and on all pixels, plus
  :func:`fastuad.metrics.aupro_reference` (the MVTec AD evaluation code: a loop over each
  image's 8-connected regions, then one ``np.argsort``). Numpy on the CPU.
* ``fastuad_cpu``: :func:`fastuad.metrics.evaluate` on CPU tensors.
* ``fastuad_cuda``: the same on CUDA tensors (skipped without a GPU).

Each fastuad result is first checked against the reference (every metric within 1e-6), then
timed; records carry ``speedup_vs_reference``. At full size one reference call takes minutes
(313 s on a loaded 2-core CPU, against 17 s for ``fastuad_cpu``, same results to 1e-16), so run
this file with ``--benchmark-min-rounds=1`` there.

Sizes: full on CUDA; on CPU 60 maps of 64x64 (``FASTUAD_BENCH_SIZE=cpu``), ``tiny`` 16 maps of
32x32; ``FASTUAD_BENCH_SIZE``/``FASTUAD_BENCH_TINY``/``FASTUAD_BENCH_DEVICE`` as in
``test_bench_cosine.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from fastuad.metrics import METRIC_NAMES, aupro_reference, evaluate

BACKENDS = ("reference", "fastuad_cpu", "fastuad_cuda")
SIZES = {"full": (1725, 256), "cpu": (60, 64), "tiny": (16, 32)}
TOL = 1e-6


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _size() -> str:
    if _truthy("FASTUAD_BENCH_TINY"):
        return "tiny"
    size = os.environ.get("FASTUAD_BENCH_SIZE", "").strip().lower()
    if size:
        if size not in SIZES:
            raise ValueError(f"FASTUAD_BENCH_SIZE must be one of {', '.join(SIZES)}, got {size!r}")
        return size
    name = os.environ.get("FASTUAD_BENCH_DEVICE", "").strip()
    cuda = torch.device(name).type == "cuda" if name else torch.cuda.is_available()
    return "full" if cuda else "cpu"


SIZE = _size()
N, S = SIZES[SIZE]
CASE = f"N{N}-{S}x{S}"
_DATA: dict[str, tuple] = {}
_REFERENCE: dict[str, torch.Tensor] = {}


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded labels, scores, masks (bool) and maps (float32), as numpy arrays."""
    if CASE not in _DATA:
        g = torch.Generator().manual_seed(0)
        yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
        masks = torch.zeros(N, S, S, dtype=torch.bool)
        for _ in range(2):  # up to two elliptic defects per image
            centre = torch.rand(N, 2, 1, 1, generator=g) * S
            radius = (0.02 + 0.1 * torch.rand(N, 2, 1, 1, generator=g)) * S
            on = torch.rand(N, 1, 1, generator=g) < 0.5
            inside = ((yy - centre[:, 0]) / radius[:, 0]) ** 2 + ((xx - centre[:, 1]) / radius[:, 1]) ** 2 <= 1
            masks |= inside & on
        maps = torch.rand(N, S, S, generator=g) + masks * (0.6 * torch.rand(N, 1, 1, generator=g))
        labels = masks.flatten(1).any(1)
        scores = maps.flatten(1).amax(1)
        _DATA[CASE] = (labels.numpy(), scores.numpy(), masks.numpy(), maps.numpy())
    return _DATA[CASE]


def _f1_max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(2 * p * r / (p + r)))


def reference_metrics(labels, scores, masks, maps) -> torch.Tensor:
    """scikit-learn for AUROC/AP/F1-max and the MVTec AD code for AUPRO, as a float64 tensor."""
    m, a = masks.ravel(), maps.ravel()
    values = {
        "i_auroc": roc_auc_score(labels, scores),
        "i_ap": average_precision_score(labels, scores),
        "i_f1max": _f1_max(labels, scores),
        "p_auroc": roc_auc_score(m, a),
        "p_ap": average_precision_score(m, a),
        "p_f1max": _f1_max(m, a),
        "aupro": aupro_reference(masks, maps),
    }
    return torch.tensor([values[k] for k in METRIC_NAMES], dtype=torch.float64)


@pytest.mark.benchmark(group=f"metrics-{CASE}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics(benchmark, fastuad_bench, backend: str):
    bench = fastuad_bench
    cuda = backend == "fastuad_cuda" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bench.describe(
        workload="metrics", case=CASE, backend=backend, dtype=torch.float32, device=device, size=SIZE,
        shapes=[[N, S, S]], params={"fpr_limit": 0.3, "metrics": list(METRIC_NAMES)},
    )
    if backend == "fastuad_cuda" and not torch.cuda.is_available():
        bench.skip("fastuad_cuda needs a CUDA GPU; this machine has none")
    labels, scores, masks, maps = _data()
    if backend == "reference":
        inputs = (labels, scores, masks, maps)

        def run():
            return reference_metrics(*inputs)

        got = bench.first_call(run)
        expected = _REFERENCE.setdefault(CASE, got)
    else:
        inputs = tuple(torch.from_numpy(x).to(device) for x in (labels, scores, masks, maps))

        def run():
            out = evaluate(*inputs)
            return torch.tensor([out[k] for k in METRIC_NAMES], dtype=torch.float64)

        if CASE not in _REFERENCE:  # this backend was selected alone
            _REFERENCE[CASE] = reference_metrics(labels, scores, masks, maps)
        expected = _REFERENCE[CASE]
        got = bench.first_call(run)
    bench.assert_close("metrics", got, expected, TOL)
    bench.measure(run, device=device, bytes_read=sum(x.nbytes for x in (masks, maps)), bytes_label="bytes_in")

    records = [r for r in bench.store.records if r["test"] == bench.request.node.nodeid]
    reference_s = bench.store.medians.get(("metrics", CASE), {}).get("reference")
    if records and reference_s:
        records[-1]["speedup_vs_reference"] = reference_s / records[-1]["median_s"]
        benchmark.extra_info["speedup_vs_reference"] = records[-1]["speedup_vs_reference"]
