"""Training loop, checkpoints, resume, evaluation and prediction on a tiny generated MVTec folder."""

import csv

import pytest
import torch

from fastuad.data.demo import make_demo_dataset
from fastuad.engine import (
    METRIC_KEYS,
    EngineError,
    TrainConfig,
    evaluate,
    format_table,
    load_checkpoint,
    predict,
    resolve_device,
    save_checkpoint,
    train,
)
from fastuad.models import create_model


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread here (two threads fighting other jobs for two cores run many times slower);
    restored after each test, since the CLI also sets the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "data"
    return make_demo_dataset(root, image_size=64, n_train=4, n_test_good=2, n_test_per_defect=1, classes=("brick", "coffee"))


def _cfg(root, out, **kw):
    base = dict(model="rd4ad", dataset="mvtec", data_root=str(root), out=str(out), epochs=1, batch_size=4, image_size=64, progress=False)
    return TrainConfig(**{**base, **kw})


def test_resumed_training_equals_an_uninterrupted_run(tiny_root, tmp_path):
    straight = train(_cfg(tiny_root, tmp_path / "a", epochs=2, evaluate=False))
    train(_cfg(tiny_root, tmp_path / "b", epochs=1, evaluate=False))
    resumed = train(_cfg(tiny_root, tmp_path / "b", epochs=2, resume=True, evaluate=False))
    assert len(straight["history"]) == len(resumed["history"]) == 2
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["config"] == {
        "name": "rd4ad", "backbone": "efficientnet_lite0", "image_size": 64, "layers": [1, 2, 3],
        "feature_location": "bottleneck", "linear_out": True, "hard_quantile": 0.9, "easy_weight": 0.1,
        "preset": "default",
    }
    assert not any(k.startswith("encoder.") for k in a["model"])  # rebuilt from the packaged weights
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["epoch_002.pt", "last.pt"]  # atomic: no *.tmp left


def test_evaluate_predict_and_checkpoint_round_trip(tiny_root, tmp_path):
    result = train(_cfg(tiny_root, tmp_path / "run"))
    metrics = result["metrics"]
    assert sorted(metrics["per_class"]) == ["brick", "coffee"]
    assert set(METRIC_KEYS) <= set(metrics["mean"]) and all(0 <= metrics["mean"][k] <= 1 for k in METRIC_KEYS)
    table = format_table(metrics)
    assert table.splitlines()[0].split() == ["class", *METRIC_KEYS] and table.splitlines()[-1].startswith("mean")

    model, ckpt = load_checkpoint(result["checkpoint"])
    assert ckpt["classes"] == ["brick", "coffee"] and not model.training
    from fastuad.data import build_dataset

    again = evaluate(model, build_dataset("mvtec", tiny_root, "test", image_size=64), progress=False)
    for k in METRIC_KEYS:
        assert again["mean"][k] == pytest.approx(metrics["mean"][k], abs=1e-6)

    images = sorted((tiny_root / "brick" / "test").glob("*/000.png"))
    rows = predict(model, images, tmp_path / "pred", progress=False)
    assert len(rows) == len(images) == 4
    with open(tmp_path / "pred" / "scores.csv") as fh:
        table_rows = list(csv.DictReader(fh))
    assert [r["image"] for r in table_rows] == [str(p) for p in images]
    from fastuad.engine import load_image

    x = torch.stack([load_image(p, 64)[0] for p in images])
    with torch.no_grad():
        _, scores = model(x)
    for r, s in zip(table_rows, scores):
        assert float(r["score"]) == pytest.approx(float(s), rel=1e-4)
        assert (tmp_path / "pred").joinpath(r["heatmap"].split("/")[-1]).is_file()
    names = sorted(p.name for p in (tmp_path / "pred").glob("*.png"))
    assert names == ["blob_000_heatmap.png", "good_000_heatmap.png", "scratch_000_heatmap.png", "spot_000_heatmap.png"]


def test_checkpoint_errors(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(EngineError, match="not a fastuad checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(EngineError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    model = create_model("rd4ad", image_size=64)
    path = save_checkpoint(tmp_path / "m.pt", model, None, 3)
    with pytest.raises(EngineError, match="checkpoint of model 'rd4ad', not 'dualad'"):
        load_checkpoint(path, model="dualad")
    # a checkpoint whose tensors belong to another architecture
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["backbone"] = "resnet18"
    ckpt["encoder_in_state"] = True
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(EngineError, match="does not fit model 'rd4ad' on backbone 'resnet18'"):
        load_checkpoint(tmp_path / "other.pt")


def test_encoder_is_stored_when_it_cannot_be_rebuilt(tmp_path):
    model = create_model("rd4ad", backbone="resnet18", image_size=64, weights="random").eval()
    path = save_checkpoint(tmp_path / "r.pt", model, None, 1)
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["encoder_in_state"] and any(k.startswith("encoder.") for k in ckpt["model"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_is_a_user_error():
    with pytest.raises(EngineError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_missing_data_root(tmp_path):
    with pytest.raises(EngineError, match="data root not found"):
        train(_cfg(tmp_path / "nowhere", tmp_path / "out"))
