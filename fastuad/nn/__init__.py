"""Layers built on :mod:`fastuad.ops`, as the models use them."""

from fastuad.nn.attention import LocalCrossAttention, NeighborMaskedAttention, WindowAttention
from fastuad.nn.class_memory import ClassFeatureMemory, pooled_keys
from fastuad.nn.cosine import CosineDistanceLoss, CosineDistanceMap
from fastuad.nn.fusion import MultiScaleFeatureFusion, NonLocalBlock, SpatialAttention
from fastuad.nn.memory import MemoryBank, MemoryModule, k_center_greedy
from fastuad.nn.position import sine_position_code_2d
from fastuad.nn.reconstruction import MSECosineLoss, MSECosineMap
from fastuad.nn.standardize import TokenStandardizer
from fastuad.nn.transport import sinkhorn_divergence

__all__ = ["CosineDistanceLoss", "CosineDistanceMap", "LocalCrossAttention", "NeighborMaskedAttention", "WindowAttention"]
__all__ += ["MemoryBank", "MemoryModule", "k_center_greedy"]
__all__ += ["MSECosineLoss", "MSECosineMap", "sine_position_code_2d", "TokenStandardizer"]
__all__ += ["ClassFeatureMemory", "pooled_keys", "MultiScaleFeatureFusion", "NonLocalBlock", "SpatialAttention", "sinkhorn_divergence"]
