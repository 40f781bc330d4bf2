"""Model registry: ``@register_model`` factories and :func:`create_model`, timm-style.

A factory takes ``backbone``, ``image_size``, ``weights`` (encoder weights, see
:func:`fastuad.backbones.create_backbone`) and model-specific keyword overrides, and returns an
``nn.Module`` that follows the model contract:

- ``model.config``: a plain dict (strings, numbers, lists) that rebuilds the model with
  ``create_model(**config)`` - it is what checkpoints store;
- ``model.training_loss(batch) -> Tensor`` for a batch dict from :mod:`fastuad.data`;
- in eval mode ``model(images) -> (anomaly_map [B,1,H,W], score [B])``.

Optional parts of the contract, each used the same way by the engine for every model:

- ``model.recipe``: a :class:`~fastuad.models.recipe.TrainRecipe` (optimiser, learning rate,
  schedule, epochs, batch size, gradient clipping); without it the engine uses the default
  recipe. A model with no trainable parameters (PatchCore) skips the gradient loop.
- ``model.fit_memory(loader, epoch, progress) -> None``: sees the training set outside the
  gradient loop, before every epoch (``epoch`` counts from 0), under ``torch.no_grad()`` and in
  eval mode. Models that keep memories or banks (PatchCore, DM-GRD, MDD-Net) fill or refresh
  them here and decide themselves at which epochs to do so. Whatever it fills must live in
  buffers (the state dict), so checkpoints save it and ``--resume`` restores it.

Factories are registered with the presets they know (``"default"`` always); ``create_model``
rejects any other preset with a :class:`ModelError` naming the allowed ones, and records the
preset in ``model.config`` so a checkpoint rebuilds the same model.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from fastuad.backbones import DEFAULT_BACKBONE
from fastuad.errors import FastUADError

__all__ = ["register_model", "create_model", "list_models", "list_presets", "ModelError", "TrainRecipe"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_PRESETS: dict[str, tuple[str, ...]] = {}


class ModelError(FastUADError, ValueError):
    """A model that cannot be built as asked (unknown name, bad override)."""


def register_model(
    fn: Callable[..., nn.Module] | None = None, *, name: str | None = None, presets: tuple[str, ...] = ("default",)
):
    """Decorator adding a model factory to the registry under ``name`` (default: the function's name).

    ``presets`` lists the values the factory's ``preset`` argument accepts; a factory that
    declares presets other than ``"default"`` must take ``preset=`` as a keyword.
    """

    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = f
        _PRESETS[key] = tuple(presets)
        return f

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_REGISTRY)


def list_presets(name: str) -> tuple[str, ...]:
    """The presets model ``name`` accepts (``"default"`` first)."""
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _PRESETS[name]


def create_model(
    name: str, backbone: str | None = None, image_size: int | None = None, preset: str = "default", **overrides
) -> nn.Module:
    """Build the registered model ``name`` on ``backbone`` for ``image_size`` px inputs.

    ``backbone`` and ``image_size`` default to the preset's (for ``"default"``: EfficientNet-Lite0
    at 256 px). ``preset="paper"`` is the authors' configuration where a model has one.
    ``overrides`` go to the factory (e.g. ``weights=PATH`` for the encoder, ``embed_dim=...``).
    Unknown names, presets and overrides raise :class:`ModelError` naming the choices.
    """
    presets = list_presets(name)
    if preset not in presets:
        raise ModelError(f"model {name!r} has no preset {preset!r}; allowed presets: {', '.join(presets)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32 or image_size % 32):
        raise ModelError(f"image_size must be a multiple of 32 and >= 32, got {image_size!r}")
    kwargs = dict(overrides)
    if backbone is not None:
        kwargs["backbone"] = backbone
    if image_size is not None:
        kwargs["image_size"] = image_size
    if len(presets) > 1:
        kwargs["preset"] = preset
    try:
        model = _REGISTRY[name](**kwargs)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise ModelError(f"model {name!r}: {exc}") from exc
        raise
    except ValueError as exc:  # a layer refusing an option's value: the user's input, named by the layer
        if isinstance(exc, FastUADError):
            raise
        raise ModelError(f"model {name!r}: {exc}") from exc
    model.config.setdefault("preset", preset)
    return model


from fastuad.models.recipe import TrainRecipe  # noqa: E402

# Importing the model modules registers them.
from fastuad.models import dmgrd, dualad, mddnet, patchcore, rd4ad, rlr  # noqa: E402,F401
