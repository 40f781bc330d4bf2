"""Model registry: ``@register_model`` factories and :func:`create_model`, timm-style.

A factory takes ``backbone``, ``image_size``, ``weights`` (encoder weights, see
:func:`fastuad.backbones.create_backbone`) and model-specific keyword overrides, and returns an
``nn.Module`` that follows the model contract:

- ``model.config``: a plain dict (strings, numbers, lists) that rebuilds the model with
  ``create_model(**config)`` - it is what checkpoints store;
- ``model.training_loss(batch) -> Tensor`` for a batch dict from :mod:`fastuad.data`;
- in eval mode ``model(images) -> (anomaly_map [B,1,H,W], score [B])``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from fastuad.backbones import DEFAULT_BACKBONE

__all__ = ["register_model", "create_model", "list_models", "ModelError"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name, bad override)."""


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Decorator adding a model factory to the registry under ``name`` (default: the function's name)."""

    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = f
        return f

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_REGISTRY)


def create_model(name: str, backbone: str = DEFAULT_BACKBONE, image_size: int = 256, **overrides) -> nn.Module:
    """Build the registered model ``name`` on ``backbone`` for ``image_size`` px inputs.

    ``overrides`` go to the factory (e.g. ``weights=PATH`` for the encoder, ``embed_dim=...``).
    Unknown names and unknown overrides raise :class:`ModelError` naming the choices.
    """
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32 or image_size % 32:
        raise ModelError(f"image_size must be a multiple of 32 and >= 32, got {image_size!r}")
    try:
        return _REGISTRY[name](backbone=backbone, image_size=image_size, **overrides)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise ModelError(f"model {name!r}: {exc}") from exc
        raise


# Importing the model modules registers them.
from fastuad.models import rd4ad  # noqa: E402,F401
