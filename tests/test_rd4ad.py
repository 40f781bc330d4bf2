"""RD4AD and the model registry."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

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


def test_loss_is_summed_mean_cosine_distance_and_training_only_touches_the_student():
    torch.manual_seed(0)
    m = create_model("rd4ad", image_size=64).train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    teacher, student = m.features(x)
    want = sum((1 - F.cosine_similarity(t, s, dim=1)).mean() for t, s in zip(teacher, student))
    loss = m.training_loss({"image": x})
    torch.testing.assert_close(loss, want)
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
    assert cfg == {"name": "rd4ad", "backbone": "efficientnet_lite0", "image_size": 64, "layers": [1, 2, 3], "preset": "default"}
    again = create_model(cfg.pop("name"), **cfg)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_other_backbone_and_bottleneck_options():
    m = create_model("rd4ad", backbone="resnet18", image_size=64, weights="random", bottleneck_stride=1, embed_dim=64).eval()
    assert m.config["bottleneck_stride"] == 1 and m.config["embed_dim"] == 64
    with torch.no_grad():
        amap, score = m(torch.randn(1, 3, 64, 64))
    assert amap.shape == (1, 1, 64, 64) and torch.isfinite(score).all()
    x = torch.randn(2, 3, 64, 64)
    relu_out = create_model("rd4ad", image_size=64).features(x)[1]
    linear = create_model("rd4ad", image_size=64, linear_out=True).features(x)[1]
    assert all((s >= 0).all() for s in relu_out) and all((s < 0).any() for s in linear)
    with pytest.raises(ValueError, match="bottleneck_stride must be 1 or 2"):
        create_model("rd4ad", image_size=64, bottleneck_stride=3)
