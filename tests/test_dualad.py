"""DualAD (heterogeneous, ``dualad``) and DualAD-Ho (homogeneous, ``dualad_ho``)."""

import json

import pytest
import torch
import torch.nn.functional as F

import fastuad
from fastuad.data.demo import make_demo_dataset
from fastuad.engine import TrainConfig, load_checkpoint, save_checkpoint, train
from fastuad.models import ModelError, create_model, list_models, list_presets
from test_engine import _one_thread  # noqa: F401  (one torch thread per test)

NAMES = ("dualad", "dualad_ho")


@pytest.fixture(scope="module")
def tiny_images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_presets_and_shapes(name, tiny_images):
    assert name in list_models() and list_presets(name) == ("default", "paper")
    torch.manual_seed(0)
    m = create_model(name, image_size=64).eval()
    assert m.config["name"] == name and m.config["preset"] == "default"
    target = m.target(tiny_images)
    assert target.shape == (2, 24 + 40 + 112, m.grid, m.grid)
    assert m.reconstruct(target).shape == target.shape
    with torch.no_grad():
        amap, score = m(tiny_images)
    assert amap.shape == (2, 1, 64, 64) and amap.dtype == torch.float32 and score.shape == (2,)
    assert torch.isfinite(amap).all() and (amap >= 0).all()
    again = create_model(**m.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_map_and_score_follow_the_paper_definition(tiny_images):
    torch.manual_seed(0)
    m = create_model("dualad", image_size=64).eval()
    with torch.no_grad():
        amap, score = m(tiny_images)
        target = m.target(tiny_images)
        rec = m.reconstruct(target)
    ref = torch.ones(2, 1, m.grid, m.grid)
    for t, r in zip(target.split([24, 40, 112], 1), rec.split([24, 40, 112], 1)):
        ref = ref * ((r - t) ** 2).mean(1, keepdim=True).sqrt()
    ref = F.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(amap, ref)
    k = m.score_pool
    assert k == round(16 * 64 / 224)
    torch.testing.assert_close(score, F.avg_pool2d(ref, k, stride=1).flatten(1).amax(1))


@pytest.mark.parametrize("name", NAMES)
def test_training_lowers_the_reconstruction_error(name):
    torch.manual_seed(0)
    m = create_model(name, image_size=64)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    def clean_error() -> float:
        m.eval()
        with torch.no_grad():
            t = m.target(x)
            return F.mse_loss(m.reconstruct(t), t).item()

    before = clean_error()
    m.train()
    loss = m.training_loss({"image": x})
    assert loss.dim() == 0 and loss.requires_grad
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(12):
        opt.zero_grad()
        m.training_loss({"image": x}).backward()
        opt.step()
    assert clean_error() < 0.8 * before
    assert all(p.grad is None for p in m.encoder.parameters())


def test_options_memory_temperature_and_skip(tiny_images):
    torch.manual_seed(0)
    he = create_model("dualad", image_size=64, memory_temperature=0.1).eval()
    assert all(mem.temperature == 0.1 for mem in he.wsn.memories)
    ho = create_model("dualad_ho", image_size=64, skip=True).eval()
    plain = create_model("dualad_ho", image_size=64).eval()
    plain.load_state_dict(ho.state_dict())
    with torch.no_grad():
        t = ho.target(tiny_images)
        # with skip the wide encoder's tokens reach the wide decoder: another reconstruction
        assert not torch.allclose(ho.reconstruct(t), plain.reconstruct(t))
        assert ho(tiny_images)[0].shape == (2, 1, 64, 64)


def test_loss_is_the_mse_summed_over_level_chunks():
    torch.manual_seed(0)
    m = create_model("dualad", image_size=64, jitter=0.0, dropout=0.0).train()
    x = torch.randn(2, 3, 64, 64)
    t = m.target(x)
    rec = m.reconstruct(t)
    want = sum(F.mse_loss(r, c) for c, r in zip(t.split([24, 40, 112], 1), rec.split([24, 40, 112], 1)))
    torch.testing.assert_close(m.training_loss({"image": x}), want)


def test_jitter_scales_with_the_per_channel_token_std():
    torch.manual_seed(0)
    m = create_model("dualad", image_size=64).train()
    seen = []
    m.wsn.mlp_in.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    t = m.target(torch.randn(2, 3, 64, 64))
    m.reconstruct(t, jitter=True)
    z = m.standardizer(t)  # the default preset jitters the standardised tokens
    noise = seen[0] - z.permute(0, 2, 3, 1)
    std = z.flatten(2).std(dim=2)  # [B, C]
    ratio = noise.flatten(1, 2).std(dim=1) / std
    assert 2.0 < ratio.median().item() < 4.5  # randn * std * 3.2 over 16 tokens


def test_token_standardizer_holds_the_training_set_statistics():
    from fastuad.nn import TokenStandardizer

    torch.manual_seed(0)
    x = torch.randn(6, 5, 4, 4) * torch.tensor([1.0, 3.0, 0.5, 10.0, 2.0]).view(1, -1, 1, 1) + 7.0
    norm = TokenStandardizer(5)
    torch.testing.assert_close(norm(x), x)  # identity before any statistics
    for part in x.split([1, 3, 2]):  # merged batch by batch
        norm.update(part)
    flat = x.transpose(0, 1).reshape(5, -1).double()
    assert norm.count.item() == flat.shape[1]
    torch.testing.assert_close(norm.mean, flat.mean(1))
    torch.testing.assert_close(norm.m2 / norm.count, flat.var(1, unbiased=False))
    z = norm(x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.transpose(0, 1).reshape(5, -1).mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.transpose(0, 1).reshape(5, -1).std(1, unbiased=False), torch.ones(5))
    torch.testing.assert_close(norm.inverse(z), x)


def test_standardised_reconstruction_does_not_depend_on_the_feature_scale(tiny_images):
    from fastuad.nn import TokenStandardizer

    torch.manual_seed(0)
    m = create_model("dualad", image_size=64).eval()
    assert m.standardizer is not None and all(mem.temperature == 0.1 for mem in m.wsn.memories)
    assert create_model("dualad", preset="paper", weights="random").standardizer is None
    t = m.target(tiny_images)
    a = torch.rand(1, t.shape[1], 1, 1) * 5 + 0.5
    b = torch.randn(1, t.shape[1], 1, 1) * 3
    with torch.no_grad():
        m.standardizer.update(t)
        rec = m.reconstruct(t)
        count = m.standardizer.count.clone()
        rec_again = m.reconstruct(t)  # eval mode: the statistics stay as they are
        assert torch.equal(m.standardizer.count, count)
        m.standardizer = TokenStandardizer(t.shape[1])
        m.standardizer.update(a * t + b)
        torch.testing.assert_close(m.reconstruct(a * t + b), a * rec + b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rec_again, rec)
    m.train()
    m.training_loss({"image": tiny_images})  # training updates the statistics
    assert m.standardizer.count.item() == count.item() + t.shape[0] * m.grid * m.grid
    assert {f"standardizer.{k}" for k in ("count", "mean", "m2", "shift", "scale")} <= set(m.state_dict())


def test_export_carries_the_fitted_statistics_in_float32(tmp_path, tiny_images):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from fastuad.export import to_onnx

    torch.manual_seed(0)
    m = create_model("dualad", image_size=64, weights="random").eval()
    m.standardizer.update(m.target(tiny_images) * 3 + 2)
    path = to_onnx(m, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    assert all(init.data_type != onnx.TensorProto.DOUBLE for init in graph.initializer)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        amap, score = m(x)
    got_map, got_score = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got_map), amap, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(got_score), score, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tmp_path, tiny_images):
    torch.manual_seed(0)
    m = create_model(name, image_size=64).eval()
    m.standardizer.update(m.target(tiny_images) * 2 + 1)  # non-trivial statistics travel too
    path = save_checkpoint(tmp_path / "m.pt", m, None, epoch=1)
    again, ckpt = load_checkpoint(path)
    assert again.config == m.config and ckpt["epoch"] == 1
    with torch.no_grad():
        a, s = m(tiny_images)
        b, t = again(tiny_images)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s, t)


@pytest.mark.parametrize("name", NAMES)
def test_unified_training_through_the_engine(name, tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("tiny") / "data", image_size=64, n_train=2, n_test_good=1,
                             n_test_per_defect=1, classes=("brick", "coffee"))
    result = train(TrainConfig(model=name, dataset="mvtec", data_root=str(root), out=str(tmp_path_factory.mktemp("ck")),
                               epochs=1, batch_size=4, image_size=64, progress=False))
    assert result["epochs_run"] == 1 and len(result["history"]) == 1 and result["history"][0] > 0
    assert sorted(result["metrics"]["per_class"]) == ["brick", "coffee"]
    assert result["recipe"]["optimizer"] == "adamw" and result["recipe"]["grad_clip"] == 0.1


def test_trace_goes_through_the_fused_ops(tiny_images):
    torch.manual_seed(0)
    he = create_model("dualad", image_size=64).eval()
    with torch.no_grad(), fastuad.ops.trace() as calls:
        he(tiny_images)
    attn = [c for c in calls if c.op == "local_attention"]
    depth = len(he.ndn.encoder)
    assert len(attn) == 3 * depth  # one per encoder layer, two per decoder layer
    assert len([c for c in calls if c.op == "memory_read"]) == depth
    assert {c.op for c in calls} == {"local_attention", "memory_read"}
    modes = {mod.mode for mod in he.modules() if isinstance(mod, fastuad.nn.NeighborMaskedAttention)}
    assert modes == {"outside"}
    ho = create_model("dualad_ho", image_size=64).eval()
    with torch.no_grad(), fastuad.ops.trace() as calls:
        ho(tiny_images)
    wide = len(ho.wsn.encoder)
    assert [c.op for c in calls] == ["local_attention"] * (3 * depth + 3 * wide)


def test_every_attention_masks_the_neighbourhood_out():
    m = create_model("dualad_ho", image_size=64)
    attns = [mod for mod in m.modules() if isinstance(mod, fastuad.nn.NeighborMaskedAttention)]
    assert attns and all(a.mode == "outside" and a.window == (3, 3) for a in attns)
    assert not any(isinstance(mod, torch.nn.MultiheadAttention) for mod in m.modules())


def test_bad_input_names_the_argument_and_the_choices():
    with pytest.raises(ModelError, match="window must be an odd int <= the token grid side 4.*allowed: 1, 3; got 7"):
        create_model("dualad", image_size=64, window=7)
    with pytest.raises(ModelError, match="window must be an odd int, got 4"):
        create_model("dualad", image_size=128, window=4)
    with pytest.raises(ModelError, match="image_size must be a multiple of 48"):
        create_model("dualad", image_size=64, pool=3)
    with pytest.raises(ModelError, match="image_size must be a multiple of 32"):
        create_model("dualad_ho", image_size=100)
    with pytest.raises(ModelError, match="no preset 'tiny'; allowed presets: default, paper"):
        create_model("dualad", preset="tiny")
    with pytest.raises(ModelError, match="backbone must be one of wide_resnet50_2, resnet50, resnet34, got 'efficientnet_lite0'"):
        create_model("dualad", preset="paper", backbone="efficientnet_lite0")
    with pytest.raises(ModelError, match="unexpected keyword argument 'bogus'; allowed: .*window"):
        create_model("dualad", image_size=64, bogus=1)
    with pytest.raises(ModelError, match="width must be even and divisible by num_heads"):
        create_model("dualad", image_size=64, width=30)


def test_paper_preset_matches_the_authors_parameter_count():
    he = create_model("dualad", preset="paper", weights="random")
    assert he.config["backbone"] == "wide_resnet50_2" and he.image_size == 224 and he.grid == 14
    assert he.channels == [256, 512, 1024]
    trainable = sum(p.numel() for p in he.parameters() if p.requires_grad)
    assert abs(trainable - 30_656_768) <= 0.01 * 30_656_768, trainable
    mlps = sum(p.numel() for mod in (he.wsn.mlp_in, he.wsn.mlp_out) for p in mod.parameters())
    assert mlps == 23_079_680
    assert all(mem.memory.shape == (196, 256) for mem in he.wsn.memories)
    torch.testing.assert_close(torch.stack([mem.memory.norm(dim=1) for mem in he.wsn.memories]), torch.ones(4, 196))
    r = he.recipe
    assert (r.optimizer, r.lr, r.weight_decay, r.batch_size, r.epochs, r.grad_clip, r.schedule, r.milestones) == (
        "adamw", 1e-4, 1e-4, 16, 1200, 0.1, "step", (1000,))
    ho = create_model("dualad_ho", preset="paper", weights="random")
    # 2 wide encoder + 2 wide decoder layers at width 1024: the paper's 137.3 M minus the backbone
    # its heterogeneous row implies (97.5 M - 30.66 M) is 70.46 M
    assert abs(sum(p.numel() for p in ho.parameters() if p.requires_grad) - 70.46e6) <= 0.01 * 70.46e6


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """One working folder for both variants: the demo set is written once and reused."""
    return tmp_path_factory.mktemp("demo")


def _demo(name, tmp_path, capsys):
    from fastuad.cli import main

    assert main(["demo", "--model", name, "--out", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(metrics["per_class"]) == ["brick", "chelsea", "coffee", "grass", "gravel"]
    assert "epoch 10/10" in out
    return metrics["mean"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_demo_accuracy(name, demo_dir, capsys):
    """10 CPU epochs of the default preset on the demo set, through ``fastuad demo``: the issue's bar.

    Measured 2026-11-23 on the 2-core CPU, seed 0: dualad 0.903 / 0.957, dualad_ho 0.893 / 0.948
    (image / pixel AUROC; before the standardised tokens, T=0.1 memory addressing and batch 4:
    0.703 / 0.882 and 0.694 / 0.874).
    """
    mean = _demo(name, demo_dir, capsys)
    assert mean["i_auroc"] >= 0.85 and mean["p_auroc"] >= 0.90, mean
