"""fastuad: fast multi-class unsupervised anomaly detection for industrial images."""

from fastuad._version import __version__
from fastuad import nn, ops

__all__ = ["__version__", "nn", "ops", "create_model", "list_models"]


def __getattr__(name: str):
    """``fastuad.create_model`` / ``fastuad.list_models``, imported on first use (timm is slow to import)."""
    if name in ("create_model", "list_models"):
        from fastuad import models

        return getattr(models, name)
    raise AttributeError(f"module 'fastuad' has no attribute {name!r}")
