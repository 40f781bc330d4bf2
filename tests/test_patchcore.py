"""PatchCore: patch features, one coreset bank through fit_memory, knn scoring, checkpoints, the demo bar."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

import fastuad
from fastuad.cli import main
from fastuad.engine import load_checkpoint, save_checkpoint, train
from fastuad.models import ModelError, create_model
from test_engine import _cfg, _one_thread, tiny_root  # noqa: F401  (shared fixtures)


class _Loader(list):
    """A list of batches with the ``dataset`` length fit_memory preallocates from."""

    def __init__(self, batches):
        super().__init__(batches)
        self.dataset = range(sum(b["image"].shape[0] for b in batches))


def _images(n, seed):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = create_model("patchcore", image_size=64, coreset_ratio=0.5).eval()
    model.fit_memory(_Loader([{"image": _images(3, 1)}, {"image": _images(2, 2)}]), epoch=0, progress=False)
    return model


def test_patch_features_and_bank_shapes(fitted):
    x = _images(2, 3)
    feats = fitted.embed(x)
    # EfficientNet-Lite0 strides 8 and 16 -> the stride-8 grid, projected to embed_dim
    assert feats.shape == (2, 128, 8, 8) and feats.dtype == torch.float32
    assert len(fitted.bank) == round(0.5 * 5 * 8 * 8) and fitted.bank.features.shape[1] == 128
    assert not any(p.requires_grad for p in fitted.parameters())
    assert fitted.recipe.epochs == 1
    # the projection is PatchCore's: 3x3 local mean, upsampling, adaptive average pooling over channels
    l2, l3 = fitted.encoder(x)
    agg = [F.avg_pool2d(f, 3, 1, 1, count_include_pad=False) for f in (l2, l3)]
    agg[1] = F.interpolate(agg[1], size=(8, 8), mode="bilinear", align_corners=False)
    pooled = [F.adaptive_avg_pool1d(a.permute(0, 2, 3, 1).reshape(-1, 1, a.shape[1]), 128) for a in agg]
    want = F.adaptive_avg_pool1d(torch.cat(pooled, dim=2), 128).reshape(2, 8, 8, 128).permute(0, 3, 1, 2)
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)


def test_scores_follow_the_paper(fitted):
    x = _images(2, 4)
    with fastuad.ops.trace() as calls:
        amap, score = fitted(x)
    assert any(c.op == "knn" for c in calls)
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,) and amap.dtype == torch.float32
    feats = fitted.embed(x)
    q = feats.permute(0, 2, 3, 1).reshape(2, -1, 128)
    bank = fitted.bank.features
    d = torch.cdist(q, bank[None].expand(2, -1, -1))  # [2, 64, M]
    nearest, idx = d.min(dim=2)
    # map: nearest-entry distance, bilinear to 64 px, scipy Gaussian sigma 4
    up = F.interpolate(nearest.view(2, 1, 8, 8), size=(64, 64), mode="bilinear", align_corners=False)[:, 0].numpy()
    ref = np.stack([gaussian_filter(m.astype(np.float64), 4, mode="reflect", truncate=4.0) for m in up])
    np.testing.assert_allclose(amap[:, 0].numpy(), ref, atol=1e-4, rtol=1e-4)
    # image score: eq. 7 over the 9 bank neighbours of m*
    for b in range(2):
        s_star, p = nearest[b].max(0)
        m_star = bank[idx[b, p]]
        nb = torch.cdist(m_star[None], bank)[0].topk(9, largest=False).indices
        dists = (bank[nb] - q[b, p]).norm(dim=1)
        w = 1 - torch.exp(dists[0]) / torch.exp(dists).sum()
        torch.testing.assert_close(score[b], w * s_star, atol=1e-4, rtol=1e-4)
        assert score[b] < s_star


def test_checkpoint_round_trip_gives_identical_maps(fitted, tmp_path):
    path = save_checkpoint(tmp_path / "pc.pt", fitted, None, 1)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model"]["bank.features"].shape == fitted.bank.features.shape
    assert not any(k.startswith("encoder.") for k in ckpt["model"])  # rebuilt from the packaged weights
    loaded, _ = load_checkpoint(path, model="patchcore")
    assert len(loaded.bank) == len(fitted.bank) and loaded.config == fitted.config
    x = _images(2, 5)
    a_map, a_score = fitted(x)
    b_map, b_score = loaded(x)
    torch.testing.assert_close(b_map, a_map, rtol=0, atol=0)
    torch.testing.assert_close(b_score, a_score, rtol=0, atol=0)


def test_unfilled_bank_and_bad_arguments_are_model_errors():
    model = create_model("patchcore", image_size=64).eval()
    with pytest.raises(ModelError, match="memory bank is empty"):
        model(_images(1, 6))
    with pytest.raises(ModelError, match="coreset_ratio must lie in"):
        create_model("patchcore", image_size=64, coreset_ratio=0)
    with pytest.raises(ModelError, match="no gradient training"):
        model.training_loss({"image": _images(1, 6)})


def test_train_builds_the_bank_in_one_pass_and_cli_takes_the_ratio(tiny_root, tmp_path, capsys):
    result = train(_cfg(tiny_root, tmp_path / "a", model="patchcore", epochs=None, batch_size=None, model_args={"coreset_ratio": 0.25}))
    assert result["epochs_run"] == 1 and result["recipe"]["epochs"] == 1
    assert result["metrics"]["mean"]["p_auroc"] > 0.5
    model, ckpt = load_checkpoint(result["checkpoint"])
    # 8 training images of 64 px: 8 x 8 x 8 patches, a quarter kept
    assert len(model.bank) == round(0.25 * 8 * 64) and ckpt["config"]["coreset_ratio"] == 0.25
    args = ["train", "--model", "patchcore", "--dataset", "mvtec", "--data-root", str(tiny_root), "--image-size", "64",
            "--out", str(tmp_path / "b"), "--no-progress", "--no-eval", "--coreset-ratio", "0.05"]
    assert main(args) == 0
    assert len(load_checkpoint(tmp_path / "b" / "last.pt")[0].bank) == round(0.05 * 8 * 64)
    assert main([*args[:-1], "1.5", "--overwrite"]) == 2
    assert "--coreset-ratio must lie in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_reaches_the_issue_accuracy(tmp_path, capsys):
    """The issue's bar: PatchCore on the demo set: image AUROC >= 0.90, pixel AUROC >= 0.93."""
    assert main(["demo", "--model", "patchcore", "--out", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(metrics["per_class"]) == ["brick", "chelsea", "coffee", "grass", "gravel"]
    assert metrics["mean"]["i_auroc"] >= 0.90 and metrics["mean"]["p_auroc"] >= 0.93, metrics["mean"]
    assert "epoch 1/1" in out
    assert len(list((tmp_path / "heatmaps").glob("*_heatmap.png"))) == 20
