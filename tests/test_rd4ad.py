"""RD4AD and the model registry."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from conftest import hard_mining_easy_mask
import fastuad
from fastuad.models import ModelError, create_model, list_models, register_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("rd4ad", image_size=64)


def test_registry():
    assert "rd4ad" in list_models() and fastuad.list_models() == list_models()
    assert fastuad.create_model is create_model
    with pytest.raises(ModelError, match="unknown model 'nope'; available: .*rd4ad"):
        create_model("nope")
    with pytest.raises(ModelError, match="unexpected keyword argument 'bogus'"):
        create_model("rd4ad", image_size=64, bogus=1)
    with pytest.raises(ModelError, match="image_size must be a multiple of 32"):
        create_model("rd4ad", image_size=100)
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda **kw: None, name="rd4ad")


def test_decoder_mirrors_encoder_levels(model):
    teacher, student = model.features(torch.randn(2, 3, 64, 64))
    assert [t.shape for t in teacher] == [s.shape for s in student]
    assert [t.shape[1] for t in teacher] == [24, 40, 112]


def test_eval_forward_returns_map_and_max_score_from_the_reference_definition(model):
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        amap, score = model(x)
        teacher, student = model.features(x)
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,)
    # sum over levels of the bilinearly upsampled 1 - cos, then scipy's Gaussian blur (sigma 4)
    ref = sum(
        F.interpolate((1 - F.cosine_similarity(t, s, dim=1))[:, None], size=(64, 64), mode="bilinear", align_corners=False)
        for t, s in zip(teacher, student)
    )[:, 0].numpy()
    ref = np.stack([gaussian_filter(m.astype(np.float64), 4, mode="reflect", truncate=4.0) for m in ref])
    np.testing.assert_allclose(amap[:, 0].numpy(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score, amap.flatten(1).amax(1))


def _hard_weighted_mean(d: torch.Tensor, q: float = 0.9, easy: float = 0.1) -> torch.Tensor:
    """The default loss of one level, written out: pixels below the lower q-quantile weigh ``easy``."""
    w = torch.where(hard_mining_easy_mask(d, q), easy, 1.0)
    return (d * w).sum() / w.sum()


def test_loss_is_summed_hard_mined_cosine_distance_and_training_only_touches_the_student():
    torch.manual_seed(0)
    m = create_model("rd4ad", image_size=64).train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    teacher, student = m.features(x)
    dists = [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student)]
    want = sum(_hard_weighted_mean(d) for d in dists)
    loss = m.training_loss({"image": x})
    torch.testing.assert_close(loss, want)
    assert not torch.isclose(loss, sum(d.mean() for d in dists))  # not the plain mean
    plain = create_model("rd4ad", image_size=64, hard_quantile=None).train()
    plain.load_state_dict(m.state_dict())
    t2, s2 = plain.features(x)
    torch.testing.assert_close(plain.training_loss({"image": x}), sum((1 - F.cosine_similarity(t, s, dim=1)).mean() for t, s in zip(t2, s2)))
    enc_state = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=5e-3, betas=(0.5, 0.999))
    first = loss.item()
    for _ in range(8):
        opt.zero_grad()
        loss = m.training_loss({"image": x})
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    assert all(p.grad is None for p in m.encoder.parameters())
    for k, v in m.encoder.state_dict().items():
        torch.testing.assert_close(v, enc_state[k])


def test_config_rebuilds_the_same_architecture(model):
    cfg = dict(model.config)
    assert cfg == {
        "name": "rd4ad", "backbone": "efficientnet_lite0", "image_size": 64, "layers": [1, 2, 3],
        "feature_location": "bottleneck", "linear_out": True, "hard_quantile": 0.9, "easy_weight": 0.1,
        "preset": "default",
    }
    again = create_model(cfg.pop("name"), **cfg)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_other_backbone_and_bottleneck_options():
    m = create_model("rd4ad", backbone="resnet18", image_size=64, weights="random", bottleneck_stride=1, embed_dim=64).eval()
    assert m.config["bottleneck_stride"] == 1 and m.config["embed_dim"] == 64
    with torch.no_grad():
        amap, score = m(torch.randn(1, 3, 64, 64))
    assert amap.shape == (1, 1, 64, 64) and torch.isfinite(score).all()
    x = torch.randn(2, 3, 64, 64)
    relu_out = create_model("rd4ad", image_size=64, linear_out=False).features(x)[1]
    linear = create_model("rd4ad", image_size=64).features(x)[1]
    assert all((s >= 0).all() for s in relu_out) and all((s < 0).any() for s in linear)
    with pytest.raises(ValueError, match="bottleneck_stride must be 1 or 2"):
        create_model("rd4ad", image_size=64, bottleneck_stride=3)


def test_default_student_trains_past_the_floor_of_a_relu_decoder(tmp_path):
    """Lite0's levels are signed; a decoder ending in ReLU cannot get below 1 - |t+|/|t| per level.

    The default (linear outputs) must train well past that floor on a few real images (64 px).
    The floor bounds the plain mean distance, so the loss here is the plain mean
    (``hard_quantile=None``; the default's hard-point weighting is tested above).
    """
    from fastuad.data import build_dataset
    from fastuad.data.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path, image_size=64, n_train=4, n_test_good=1, n_test_per_defect=1, classes=("brick", "coffee"))
    ds = build_dataset("mvtec", root, "train", image_size=64)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    torch.manual_seed(0)
    m = create_model("rd4ad", image_size=64, hard_quantile=None).train()
    teacher = m.encoder(x)
    relu_floor = sum(float((1 - F.cosine_similarity(t, t.clamp(min=0), dim=1)).mean()) for t in teacher)
    assert all((t < 0).float().mean() > 0.3 for t in teacher)  # signed levels
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=5e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(30):
        loss = m.training_loss({"image": x})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], losses
    assert losses[-1] < relu_floor, (losses[-1], relu_floor)


def test_native_half_precision_features_reach_the_map():
    """Under AMP the features are fp16/bf16: the map takes them as they are (it accumulates in fp32)."""
    from fastuad.ops import trace

    torch.manual_seed(0)
    m = create_model("rd4ad", image_size=64).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        teacher, student = m.features(x)
        want = m.map_head(teacher, student)
        with trace() as calls:
            amap = m.map_head([t.half() for t in teacher], [s.half() for s in student])
        half_model = create_model("rd4ad", image_size=64)
        half_model.load_state_dict(m.state_dict())
        half_model = half_model.half().eval()
        with trace() as model_calls:
            hmap, hscore = half_model(x.half())
    assert calls[0].dtypes[0] == "float16" and amap.dtype == torch.float32
    torch.testing.assert_close(amap, want, atol=2e-3, rtol=2e-3)
    assert model_calls[-1].op == "cosine_distance_map" and model_calls[-1].dtypes[0] == "float16"
    assert hmap.dtype == torch.float32 and hmap.shape == (2, 1, 64, 64) and torch.isfinite(hscore).all()


def test_expansion_features_option_is_recorded_and_rebuilt():
    m = create_model("rd4ad", image_size=64, feature_location="expansion", decoder_width=1)
    teacher, student = m.features(torch.randn(1, 3, 64, 64))
    assert [t.shape[1] for t in teacher] == [144, 240, 672] and [s.shape for s in student] == [t.shape for t in teacher]
    cfg = dict(m.config)
    assert cfg["feature_location"] == "expansion"
    again = create_model(cfg.pop("name"), **cfg)
    assert again.encoder.channels == [144, 240, 672]
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
