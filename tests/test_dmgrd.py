"""DM-GRD, unified: per-class dual memories, the fused ops, losses that train, checkpoints, accuracy."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
    model = create_model("dmgrd", image_size=SIZE, memory_items=2).eval()
    with torch.no_grad():
        model.fit_memory(rd_train_loader, epoch=0, progress=False)
    return model


def _batch(loader):
    return next(iter(loader))


def test_fit_memory_fills_per_class_memories(fitted):
    for memory in (fitted.normal_memory, fitted.abnormal_memory):
        assert memory.num_classes == len(CLASSES) and memory.num_items == 2
        assert [tuple(memory.maps(l).shape) for l in range(3)] == [(3, 2, 24, 16, 16), (3, 2, 40, 8, 8), (3, 2, 112, 4, 4)]
    # the abnormal memory holds other (pseudo-anomalous) images than the normal one
    assert not torch.allclose(fitted.normal_memory.maps_0, fitted.abnormal_memory.maps_0)


def test_eval_map_is_summed_cosine_distance_with_sigma_4_and_score_is_top100_mean(fitted, rd_train_loader):
    x = _batch(rd_train_loader)["image"][:2]
    with torch.no_grad():
        amap, score = fitted(x)
        teacher, student, cls = fitted.features(x)
    assert amap.shape == (2, 1, SIZE, SIZE) and score.shape == (2,)
    ref = cosine_distance_map_reference(teacher, student, out_size=(SIZE, SIZE), reduction="sum", blur_sigma=4)
    torch.testing.assert_close(amap, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score, amap.flatten(1).topk(100, dim=1).values.mean(1))


def test_best_match_is_the_highest_pooled_cosine_within_the_class(fitted, rd_train_loader):
    batch = _batch(rd_train_loader)
    with torch.no_grad():
        keys = fastuad.nn.pooled_keys(fitted.encoder(batch["image"]))
    item = fitted.normal_memory.match(keys, batch["class_index"])
    bank = fitted.normal_memory.keys[batch["class_index"]]  # [B, N, D]
    want = F.cosine_similarity(keys[:, None], bank, dim=2).argmax(1)
    assert torch.equal(item, want)


def test_class_inference_is_right_on_the_test_images(fitted, rd_tiny_root):
    test = build_dataset("mvtec", rd_tiny_root, "test", image_size=SIZE)
    batch = next(iter(DataLoader(test, batch_size=len(test))))
    assert torch.equal(fitted.infer_class(batch["image"]), batch["class_index"])


def test_every_cosine_memory_read_and_search_goes_through_the_fused_ops(fitted, rd_train_loader):
    batch = _batch(rd_train_loader)
    with fastuad.ops.trace() as calls:
        with torch.no_grad():
            fitted(batch["image"][:2])
    assert {"knn", "memory_read", "cosine_distance_map"} <= {c.op for c in calls}
    fitted.train()
    try:
        with fastuad.ops.trace() as calls:
            fitted.training_loss(batch)
    finally:
        fitted.eval()
    ops = [c.op for c in calls]
    assert ops.count("memory_read") == 2 and "cosine_distance" in ops and "knn" not in ops  # training uses the true class


def test_every_loss_term_has_a_gradient(rd_train_loader):
    torch.manual_seed(0)
    # margin -1 keeps the contrast hinge active (at the paper's 0.5 it is 0 once the two paths differ enough)
    model = create_model("dmgrd", image_size=SIZE, memory_items=2, contrast_margin=-1.0).eval()
    with torch.no_grad():
        model.fit_memory(rd_train_loader)
    model.train()
    batch = _batch(rd_train_loader)  # six images, two classes: OT has pairs of one class
    terms = model.loss_terms(batch)
    assert set(terms) == {"distill", "ot", "contrast", "triplet"}
    params = [p for p in model.parameters() if p.requires_grad]
    for name, value in terms.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        norm = sum(float(g.norm()) for g in grads if g is not None)
        assert value.item() > 0 and norm > 0, name
    assert model.weights == {"separation": 0.2, "contrast": 0.1, "triplet": 0.1}
    assert (model.contrast_margin, model.triplet_margin) == (-1.0, 1.0)


def test_loss_falls_on_a_tiny_set(rd_train_loader):
    torch.manual_seed(0)
    model = create_model("dmgrd", image_size=SIZE, memory_items=2, pseudo_ratio=0.0).eval()
    with torch.no_grad():
        model.fit_memory(rd_train_loader)
    model.train()
    batch = _batch(rd_train_loader)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3, betas=(0.5, 0.999))
    losses, distill = [], []
    for _ in range(10):
        terms = model.loss_terms(batch)
        w = model.weights
        loss = terms["distill"] + w["separation"] * (terms["ot"] + w["contrast"] * terms["contrast"]) + w["triplet"] * terms["triplet"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        distill.append(terms["distill"].item())
    assert np.mean(losses[-3:]) < 0.9 * losses[0] and np.mean(distill[-3:]) < 0.8 * distill[0]
    assert all(p.grad is None for p in model.encoder.parameters())


def test_memories_survive_a_checkpoint_with_identical_maps(fitted, rd_train_loader, tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", fitted, None, 1)
    again, _ = load_checkpoint(path)
    assert again.normal_memory.num_classes == 3 and again.abnormal_memory.num_items == 2
    x = _batch(rd_train_loader)["image"][:3]
    with torch.no_grad():
        a, s = fitted(x)
        b, t = again(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s, t)


def test_bad_input_names_the_cause(fitted, rd_train_loader):
    empty = create_model("dmgrd", image_size=SIZE).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(ModelError, match="memories are empty: call model.fit_memory"):
        empty(x)
    with pytest.raises(ModelError, match="memories are empty"):
        empty.training_loss({"image": x, "class_index": torch.tensor([0])})
    with pytest.raises(ModelError, match=r"class_index out of range for the normal memory of 3 classes \(valid: 0..2\), got values \[7\]"):
        fitted(x, class_index=torch.tensor([7]))
    with pytest.raises(ModelError, match="class_index out of range for the memories of 3 classes"):
        fitted.training_loss({"image": x, "class_index": torch.tensor([3])})
    with pytest.raises(ModelError, match="model 'dmgrd' has no preset 'fast'; allowed presets: default, paper"):
        create_model("dmgrd", preset="fast")
    with pytest.raises(ModelError, match="memory_items must be a positive int"):
        create_model("dmgrd", image_size=SIZE, memory_items=0)


def test_paper_preset_matches_the_authors_parameter_count():
    model = create_model("dmgrd", preset="paper", weights="random")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 187_439_203 <= trainable <= 195_831_907
    assert 103_000_000 < sum(p.numel() for p in model.fusion.parameters()) < 104_200_000  # MSFF: 103.6 M
    assert model.encoder.channels == [256, 512, 1024] and model.image_size == 256 and model.memory_items == 30
    r = model.recipe
    assert (r.optimizer, r.lr, tuple(r.betas), r.batch_size, r.schedule) == ("adam", 0.005, (0.5, 0.999), 8, "cosine")
    assert r.warmup_steps == 500 and r.epochs * -(-3629 // 8) >= 4990  # 5000 steps on MVTec AD's 3,629 images
    assert model.config["preset"] == "paper"
    # the paper's plain mean loss and OT on the raw fusion output (the default preset has neither)
    assert (model.loss_fn.hard_quantile, model.ot_bounded, model.config["ot_bounded"]) == (None, False, False)


def test_default_student_is_linear_and_its_memory_correction_is_bounded(fitted, rd_train_loader):
    """Default preset: linear level outputs (Lite0's levels are signed) and ``teacher + tanh(fusion)``.

    The OT term rewards an ever sharper softmax of the fusion output as much as a flat one; an
    unbounded residual let the fusion output reach ~1e8 and wrecked the student (seed 2).
    """
    x = _batch(rd_train_loader)["image"][:2]
    with torch.no_grad():
        teacher = fitted.encoder(x)
        huge = [1e8 * torch.ones_like(t) for t in teacher]
        got = fitted._student(teacher, huge)
        want = fitted.decoder(fitted.bottleneck([t + 1 for t in teacher]))
        relu = create_model("dmgrd", image_size=SIZE, linear_out=False).eval().decoder(fitted.bottleneck(teacher))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert all((g < 0).any() for g in got) and all((r >= 0).all() for r in relu)


def test_default_preset_mines_hard_points_and_bounds_the_ot_input(fitted):
    """Default preset: RD4AD's hard-point loss and OT on ``softmax(tanh(fusion))`` (the paper preset: see its test).

    On unbounded logits the OT term is met by an ever sharper softmax (seed 2 of the hard-mining
    run: fusion outputs ~7e8); through ``tanh`` the softmax cannot sharpen past ``e^2`` between entries.
    """
    assert (fitted.loss_fn.hard_quantile, fitted.ot_bounded) == (0.9, True)
    assert (fitted.config["hard_quantile"], fitted.config["ot_bounded"]) == (0.9, True)

    def ot_by_hand(levels, bound):  # one class of 4 images: halves [0, 1] against [2, 3]
        return sum(
            fastuad.nn.sinkhorn_divergence(a[:2], a[2:], blur=fitted.ot_blur, iters=fitted.ot_iters)
            for a in (torch.softmax((torch.tanh(f) if bound else f).flatten(1), dim=1) for f in levels)
        )

    g = torch.Generator().manual_seed(5)
    fused = [torch.randn(4, 3, 4, 4, generator=g) for _ in range(2)]
    cls = torch.tensor([0, 0, 0, 0])
    torch.testing.assert_close(fitted._ot_term(fused, cls), ot_by_hand(fused, bound=True))
    sharp = [1e4 * f for f in fused]
    unbounded = ot_by_hand(sharp, bound=False)
    assert unbounded > 1.0 and fitted._ot_term(sharp, cls) < 0.05 * unbounded


@pytest.mark.slow
def test_demo_accuracy_after_10_cpu_epochs(tmp_path):
    """The default preset, 10 epochs on the demo set at 128 px: issue 10's bar, image AUROC >= 0.85 and pixel >= 0.90.

    Measured on a 2-core CPU (2026-11-23): seeds 0-4 give 95.0 / 97.2, 95.1 / 97.0, 94.5 / 97.2,
    94.1 / 97.6 and 95.0 / 96.9 (plain loss, OT on unbounded logits: 92.5 / 97.4, 89.5 / 96.7,
    91.6 / 97.1, 92.3 / 97.4, 87.7 / 96.8; before the linear outputs and the bounded
    correction: 82.8 / 89.1 at seed 0, and seed 2 stuck at a loss of 4.6).
    """
    root = make_demo_dataset(tmp_path / "demo", seed=0, image_size=128)
    result = train(TrainConfig(model="dmgrd", dataset="mvtec", data_root=str(root), out=str(tmp_path / "run"), image_size=128, progress=False))
    mean = result["metrics"]["mean"]
    assert mean["i_auroc"] >= 0.85 and mean["p_auroc"] >= 0.90, mean


def test_sinkhorn_divergence_is_zero_on_equal_clouds_and_the_squared_shift_over_two_otherwise():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    assert fastuad.nn.sinkhorn_divergence(x, x).abs().item() < 1e-6
    # a translation by t costs |t|^2 / 2 (the debiasing removes the entropic blur)
    torch.testing.assert_close(fastuad.nn.sinkhorn_divergence(x, x + 1.0, blur=1.0, iters=50), torch.tensor(2.5), atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="x and y must be"):
        fastuad.nn.sinkhorn_divergence(x, torch.randn(3, 4))


def test_config_records_every_preset_option_so_a_checkpoint_outlives_a_preset_change(monkeypatch):
    """The config holds each preset-derived option (not only the overrides): a model rebuilt from it is the
    one that was trained even when the preset's values have changed since."""
    from fastuad.models import dmgrd as dmgrd_module

    model = create_model("dmgrd", image_size=SIZE, memory_items=2)
    preset = {k: v for k, v in dmgrd_module._PRESETS["default"].items() if k not in ("backbone", "image_size", "layers")}
    assert {k: model.config[k] for k in preset} == {**preset, "memory_items": 2}
    monkeypatch.setitem(dmgrd_module._PRESETS, "default", {**dmgrd_module._PRESETS["default"], "residual_fusion": False, "pseudo_ratio": 0.5})
    cfg = dict(model.config)
    rebuilt = create_model(cfg.pop("name"), **cfg)
    assert (rebuilt.residual_fusion, rebuilt.pseudo_ratio, rebuilt.memory_items) == (True, 0.0, 2)
    assert create_model("dmgrd", image_size=SIZE).residual_fusion is False  # the changed preset itself
