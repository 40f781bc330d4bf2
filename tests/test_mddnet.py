"""MDD-Net: dual decoders, class-aware memory, the fused ops, losses that train, checkpoints, accuracy."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import fastuad
from fastuad.data import build_dataset
from fastuad.data.demo import make_demo_dataset
from fastuad.engine import TrainConfig, load_checkpoint, save_checkpoint, train
from fastuad.models import ModelError, create_model
from fastuad.ops import cosine_distance_map_reference
from conftest import RD_CLASSES, RD_SIZE

SIZE, CLASSES = RD_SIZE, RD_CLASSES
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(rd_train_loader):
    torch.manual_seed(0)
    model = create_model("mddnet", image_size=SIZE, class_items=2).eval()
    with torch.no_grad():
        model.fit_memory(rd_train_loader, epoch=0, progress=False)
    return model


def _batch(loader):
    return next(iter(loader))


def test_shapes_and_the_map_adds_encoder_decoder_and_weighted_decoder_decoder_discrepancies(fitted, rd_train_loader):
    x = _batch(rd_train_loader)["image"][:2]
    with torch.no_grad():
        amap, score = fitted(x)
        teacher = fitted.encoder(x)
        restored, identity = fitted.decode(teacher, fitted.infer_class(x))
    assert amap.shape == (2, 1, SIZE, SIZE) and score.shape == (2,)
    assert [r.shape for r in restored] == [i.shape for i in identity] == [t.shape for t in teacher]
    kw = dict(out_size=(SIZE, SIZE), reduction="sum", blur_sigma=4)
    ed, dd = cosine_distance_map_reference(teacher, restored, **kw), cosine_distance_map_reference(restored, identity, **kw)
    assert fitted.dd_weight == fitted.config["dd_weight"] == 0.1  # the default preset's weight, recorded
    torch.testing.assert_close(amap, ed + 0.1 * dd, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score, amap.flatten(1).amax(1))
    fitted.dd_weight = 1.0  # the paper preset's equal weights
    try:
        with torch.no_grad():
            torch.testing.assert_close(fitted(x)[0], ed + dd, atol=1e-4, rtol=1e-4)
    finally:
        fitted.dd_weight = 0.1
    # the memory banks are per class: another class gives another restoration
    other = fitted.decode(teacher, torch.tensor([2, 2]))[0]
    assert not torch.allclose(other[-1], fitted.decode(teacher, torch.tensor([0, 0]))[0][-1])


def test_class_inference_is_right_on_the_test_images(fitted, rd_tiny_root):
    assert fitted.class_keys.num_classes == len(CLASSES) and fitted.class_keys.num_items == 2
    test = build_dataset("mvtec", rd_tiny_root, "test", image_size=SIZE)
    batch = next(iter(DataLoader(test, batch_size=len(test))))
    assert torch.equal(fitted.infer_class(batch["image"]), batch["class_index"])


def test_every_cosine_memory_read_and_search_goes_through_the_fused_ops(fitted, rd_train_loader):
    batch = _batch(rd_train_loader)
    with fastuad.ops.trace() as calls:
        with torch.no_grad():
            fitted(batch["image"][:2])
    ops = [c.op for c in calls]
    assert ops.count("knn") == 1 and ops.count("memory_read") == 1 and ops.count("cosine_distance_map") == 2
    fitted.train()
    try:
        with fastuad.ops.trace() as calls:
            fitted.training_loss(batch)
    finally:
        fitted.eval()
    ops = [c.op for c in calls]
    assert ops.count("memory_read") == 1 and ops.count("cosine_distance") == 9 and "knn" not in ops  # 3 terms x 3 levels


def test_every_loss_term_has_a_gradient_and_the_mask_term_sees_the_synthetic_anomaly(rd_train_loader):
    torch.manual_seed(0)
    model = create_model("mddnet", image_size=SIZE).train()
    batch = _batch(rd_train_loader)
    terms = model.loss_terms(batch)
    assert set(terms) == {"restoration", "identity", "mask"}
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    for name, value in terms.items():
        grads = dict(zip(params, torch.autograd.grad(value, list(params.values()), retain_graph=True, allow_unused=True)))
        assert value.item() > 0 and sum(float(g.norm()) for g in grads.values() if g is not None) > 0, name
        if name == "restoration":
            assert grads["memory.memory"] is not None and float(grads["memory.memory"].norm()) > 0
            assert all(g is None for n, g in grads.items() if n.startswith("identity."))
        if name == "identity":
            assert all(g is None for n, g in grads.items() if n.startswith(("restoration.", "memory")))
    # with no synthetic anomaly the restoration and identity targets coincide
    clean = create_model("mddnet", image_size=SIZE, pseudo_ratio=0.0).train()
    t = clean.loss_terms(batch)
    assert t["mask"].item() > 0  # the decoders disagree at first; the L1 pulls that to 0


def test_loss_falls_on_a_tiny_set(rd_train_loader):
    torch.manual_seed(0)
    model = create_model("mddnet", image_size=SIZE, pseudo_ratio=0.0).train()
    batch = _batch(rd_train_loader)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(10):
        loss = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * losses[0]
    assert all(p.grad is None for p in model.encoder.parameters())


def test_class_keys_survive_a_checkpoint_with_identical_maps(fitted, rd_train_loader, tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", fitted, None, 1)
    again, _ = load_checkpoint(path)
    assert again.class_keys.num_classes == 3
    x = _batch(rd_train_loader)["image"][:3]
    with torch.no_grad():
        a, s = fitted(x)
        b, t = again(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s, t)


def test_bad_input_names_the_cause(fitted):
    empty = create_model("mddnet", image_size=SIZE).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(ModelError, match="class keys are empty: call model.fit_memory"):
        empty(x)
    with pytest.raises(ModelError, match=r"class_index out of range for the class-aware memory of 32 classes \(valid: 0..31\), got values \[40\]"):
        fitted(x, class_index=torch.tensor([40]))
    with pytest.raises(ModelError, match="class_index out of range"):
        fitted.training_loss({"image": x, "class_index": torch.tensor([-1])})
    with pytest.raises(ModelError, match="model 'mddnet' has no preset 'huge'; allowed presets: default, paper"):
        create_model("mddnet", preset="huge")
    with pytest.raises(ModelError, match="dd_weight must be a number >= 0, got -1"):
        create_model("mddnet", image_size=SIZE, dd_weight=-1)


def test_paper_preset_weighs_both_maps_equally_and_its_config_rebuilds_it():
    paper = create_model("mddnet", preset="paper", weights="random")
    assert paper.dd_weight == paper.config["dd_weight"] == 1.0 and paper.encoder.channels == [256, 512, 1024]
    # ReLU level outputs (post-ReLU ResNet levels) and the plain mean loss (the default preset has neither)
    assert (paper.linear_out, paper.loss_fn.hard_quantile, paper.config["linear_out"]) == (False, None, False)
    cfg = dict(create_model("mddnet", image_size=SIZE, dd_weight=0.25).config)
    assert cfg["dd_weight"] == 0.25 and create_model(cfg.pop("name"), **cfg).dd_weight == 0.25
    small = create_model("mddnet", image_size=SIZE, num_classes=2, class_items=1).eval()
    loader = [{"image": torch.randn(3, 3, SIZE, SIZE), "class_index": torch.tensor([0, 1, 2])}]
    with pytest.raises(ModelError, match="has 3 classes but the model was built with num_classes=2"):
        small.fit_memory(loader)
    with pytest.raises(ModelError, match=r"classes \[1\] have no training image"):
        small.fit_memory([{"image": torch.randn(2, 3, SIZE, SIZE), "class_index": torch.tensor([0, 2])}])


def test_default_decoders_are_linear_and_mine_hard_points_as_rd4ad(fitted, rd_train_loader):
    """Default preset: linear level outputs (Lite0's levels are signed) and the hard-point loss (the paper preset: see its test)."""
    x = _batch(rd_train_loader)["image"][:2]
    assert (fitted.linear_out, fitted.loss_fn.hard_quantile) == (True, 0.9)
    assert (fitted.config["linear_out"], fitted.config["hard_quantile"]) == (True, 0.9)
    assert fitted.pseudo_ratio == fitted.config["pseudo_ratio"] == 0.5  # recorded: a checkpoint resumes with the same share
    assert fitted.mine_per_group and fitted.config["mine_per_group"] is True
    with torch.no_grad():
        restored, identity = fitted.decode(fitted.encoder(x), torch.tensor([0, 1]))
        relu = create_model("mddnet", image_size=SIZE, linear_out=False).eval().decode(fitted.encoder(x), torch.tensor([0, 1]))
    assert all((r < 0).any() and (i < 0).any() for r, i in zip(restored, identity))
    assert all((r >= 0).all() and (i >= 0).all() for r, i in zip(*relu))


def test_restoration_loss_mines_clean_and_synthetic_images_apart(rd_train_loader, monkeypatch):
    """Default preset: the restoration loss mines hard points among the clean and the synthetic-anomaly
    inputs separately (their defects would take the whole hard share); the identity loss mines the batch as one."""
    torch.manual_seed(0)
    model = create_model("mddnet", image_size=SIZE).train()
    batch = _batch(rd_train_loader)
    calls = []
    real = model.loss_fn.forward
    monkeypatch.setattr(model.loss_fn, "forward", lambda a, b, groups=None: calls.append(groups) or real(a, b, groups=groups))
    terms = model.loss_terms(batch)
    n = batch["image"].shape[0]
    assert torch.equal(calls[0], torch.arange(n) % 2) and calls[1] is None  # every second image is synthetic
    model._step -= 1  # the same synthetic anomalies again
    shared = create_model("mddnet", image_size=SIZE, mine_per_group=False)
    shared.load_state_dict(model.state_dict())
    shared.train()._step = model._step
    assert shared.config["mine_per_group"] is False
    assert not torch.allclose(shared.loss_terms(batch)["restoration"], terms["restoration"])


@pytest.mark.slow
def test_demo_accuracy_after_10_cpu_epochs(tmp_path):
    """The default preset, 10 epochs on the demo set at 128 px: image AUROC >= 0.85, pixel AUROC >= 0.90."""
    root = make_demo_dataset(tmp_path / "demo", seed=0, image_size=128)
    result = train(TrainConfig(model="mddnet", dataset="mvtec", data_root=str(root), out=str(tmp_path / "run"), image_size=128, progress=False))
    mean = result["metrics"]["mean"]
    assert mean["i_auroc"] >= 0.85 and mean["p_auroc"] >= 0.90, mean


def test_config_records_every_preset_option():
    from fastuad.models import mddnet as mddnet_module

    model = create_model("mddnet", image_size=SIZE, class_items=3)
    preset = {k: v for k, v in mddnet_module._PRESETS["default"].items() if k not in ("backbone", "image_size", "layers")}
    assert {k: model.config[k] for k in preset} == preset and model.config["class_items"] == 3
