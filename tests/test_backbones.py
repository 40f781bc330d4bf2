"""Frozen timm encoders and the packaged EfficientNet-Lite0 ImageNet weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastuad.backbones import (
    BackboneError,
    create_backbone,
    load_lite0_package_state,
    map_state_by_position,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# EfficientNet-Lite0: (repeats, first stride) per stage; the block list of the package follows it.
LITE0_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]


def _same_pad(x, k, s):
    """TensorFlow 'SAME' padding (extra pixel after), as the TF-ported weights expect."""
    h, w = x.shape[-2:]
    ph = max((-(-h // s) - 1) * s + k - h, 0)
    pw = max((-(-w // s) - 1) * s + k - w, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[prefix + ".running_mean"], sd[prefix + ".running_var"], sd[prefix + ".weight"], sd[prefix + ".bias"], False, 0.0, 1e-3)


def lite0_reference_features(sd, x, expansion=False):
    """EfficientNet-Lite0 written from the package's own tensor names: block outputs by index.

    Independent of timm: if the positional mapping paired a wrong tensor, the features differ.
    ``expansion=True`` returns each block's input to its projection conv instead (post-ReLU6).
    """
    x = F.relu6(_bn(F.conv2d(_same_pad(x, 3, 2), sd["_conv_stem.weight"], stride=2), sd, "_bn0"))
    strides = [s if i == 0 else 1 for r, s in LITE0_STAGES for i in range(r)]
    outs = []
    for i, stride in enumerate(strides):
        p = f"_blocks.{i}."
        h = x
        if p + "_expand_conv.weight" in sd:
            h = F.relu6(_bn(F.conv2d(h, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
        w = sd[p + "_depthwise_conv.weight"]
        h = F.relu6(_bn(F.conv2d(_same_pad(h, w.shape[-1], stride), w, stride=stride, groups=w.shape[0]), sd, p + "_bn1"))
        expanded = h
        h = _bn(F.conv2d(h, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        x = h + x if stride == 1 and h.shape == x.shape else h
        outs.append(expanded if expansion else x)
    return outs


def test_default_encoder_matches_the_package_weights_run_by_their_own_names():
    sd = load_lite0_package_state()
    enc = create_backbone()  # efficientnet_lite0, strides 4/8/16
    assert enc.channels == [24, 40, 112] and enc.reductions == [4, 8, 16]
    raw = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = enc((raw - IMAGENET_MEAN) / IMAGENET_STD)
        ref = lite0_reference_features(sd, (raw - 0.5) / 0.5)
    # last block of the stride-4, stride-8 and stride-16 (112-channel) stages
    for got, want in zip(ours, [ref[2], ref[4], ref[10]]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_expansion_features_are_the_wide_post_activation_maps_of_the_same_blocks():
    sd = load_lite0_package_state()
    enc = create_backbone(feature_location="expansion")
    assert enc.channels == [144, 240, 672] and enc.reductions == [4, 8, 16] and enc.feature_location == "expansion"
    raw = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = enc((raw - IMAGENET_MEAN) / IMAGENET_STD)
        ref = lite0_reference_features(sd, (raw - 0.5) / 0.5, expansion=True)
    for got, want in zip(ours, [ref[2], ref[4], ref[10]]):
        assert got.shape == want.shape and (got >= 0).all()
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    with pytest.raises(BackboneError, match="feature_location must be one of bottleneck, expansion, got 'middle'"):
        create_backbone(feature_location="middle")
    with pytest.raises(BackboneError, match="backbone 'resnet18' has no feature_location='expansion'"):
        create_backbone("resnet18", weights="random", feature_location="expansion")


def test_packaged_weights_are_real_imagenet_weights():
    import skimage.data
    import timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(map_state_by_position(full.state_dict(), load_lite0_package_state()))
    cat = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255
    cat = F.interpolate(cat, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = full((cat - 0.5) / 0.5).argmax(1).item()
    assert 281 <= top <= 285  # an ImageNet domestic-cat class


def test_position_mapping_fails_loudly_on_mismatch():
    target = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(BackboneError, match=r"tensor #1 'y' has shape \(5,\)"):
        map_state_by_position(target, {"x": torch.ones(2, 3), "y": torch.ones(5)})
    with pytest.raises(BackboneError, match="has 1 tensors but the model expects 2"):
        map_state_by_position(target, {"x": torch.ones(2, 3)})
    mapped = map_state_by_position(target, {"x": torch.ones(2, 3), "y": torch.full((4,), 2.0)})
    assert list(mapped) == ["a", "b"] and mapped["b"][0] == 2.0


def test_encoder_is_frozen_and_stays_in_eval_mode():
    enc = create_backbone()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.body.training
    bn = enc.body.bn1
    before = bn.running_mean.clone()
    enc(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(bn.running_mean, before)


def test_unused_stages_are_dropped_without_changing_the_features():
    import timm

    enc = create_backbone(out_indices=(1, 2))
    full = timm.create_model("tf_efficientnet_lite0", features_only=True, pretrained=False, out_indices=(1, 2)).eval()
    full.load_state_dict({k: v for k, v in enc.body.state_dict().items()}, strict=False)
    assert len(enc.body.blocks) < len(full.blocks)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(enc.body(x), full(x)):
            torch.testing.assert_close(a, b)


def test_local_weights_file(tmp_path):
    enc = create_backbone("resnet18", weights="random")
    path = tmp_path / "r18.pt"
    torch.save(enc.body.state_dict(), path)
    again = create_backbone("resnet18", weights=path)
    assert again.weights == str(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(enc(x), again(x)):
            torch.testing.assert_close(a, b)
    bad = dict(enc.body.state_dict())
    bad["conv1.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(BackboneError, match="conv1.weight"):
        create_backbone("resnet18", weights=tmp_path / "bad.pt")
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("resnet18", weights=tmp_path / "missing.pt")


def test_packaged_file_given_as_weights_loads_by_position():
    from fastuad.backbones import lite0_weights_path

    default = create_backbone(out_indices=(1, 2))
    local = create_backbone(out_indices=(1, 2), weights=lite0_weights_path())
    assert local.weights == str(lite0_weights_path())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(default(x), local(x)):
            torch.testing.assert_close(a, b)


def test_unknown_backbone_and_unreachable_hub(monkeypatch):
    import timm

    with pytest.raises(BackboneError, match="unknown backbone 'no_such_net'"):
        create_backbone("no_such_net")
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneError, match="offline: pass --weights PATH"):
        create_backbone("resnet18")


def test_input_normalisation_is_converted_to_the_weights_convention():
    enc = create_backbone()
    np.testing.assert_allclose(enc.in_scale.flatten().numpy(), (IMAGENET_STD / 0.5).flatten().numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        enc(torch.randn(3, 32, 32))
