"""fastuad: fast multi-class unsupervised anomaly detection for industrial images."""

from fastuad._version import __version__
from fastuad import nn, ops

__all__ = ["__version__", "nn", "ops"]
