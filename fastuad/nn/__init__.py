"""Layers built on :mod:`fastuad.ops`, as the models use them."""

from fastuad.nn.cosine import CosineDistanceLoss, CosineDistanceMap

__all__ = ["CosineDistanceLoss", "CosineDistanceMap"]
