"""Layers built on :mod:`fastuad.ops`, as the models use them."""

from fastuad.nn.attention import LocalCrossAttention, NeighborMaskedAttention, WindowAttention
from fastuad.nn.cosine import CosineDistanceLoss, CosineDistanceMap
from fastuad.nn.memory import MemoryBank, MemoryModule, k_center_greedy
from fastuad.nn.position import sine_position_code_2d
from fastuad.nn.reconstruction import MSECosineLoss, MSECosineMap

__all__ = ["CosineDistanceLoss", "CosineDistanceMap", "LocalCrossAttention", "NeighborMaskedAttention", "WindowAttention"]
__all__ += ["MemoryBank", "MemoryModule", "k_center_greedy"]
__all__ += ["MSECosineLoss", "MSECosineMap", "sine_position_code_2d"]
