"""Fused ops. Each op module holds its pure-PyTorch reference, Triton kernels, autograd and dispatch.

Every op takes ``backend="auto" | "torch" | "triton" | "cuda"``; see :mod:`fastuad.ops._dispatch`.
"""

from fastuad.ops._dispatch import BACKENDS, BackendUnavailableError, OpCall, exporting, force_backend, is_exporting, trace
from fastuad.ops.cosdist import cosine_distance, cosine_distance_reference
from fastuad.ops.cosmap import (
    cosine_distance_map,
    cosine_distance_map_reference,
    gaussian_blur_reference,
    gaussian_kernel1d,
)
from fastuad.ops.knn_search import knn, knn_reference
from fastuad.ops.local_attn import local_attention, local_attention_reference, window_mask
from fastuad.ops.memory import memory_entropy_loss, memory_read, memory_read_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "OpCall",
    "trace",
    "force_backend",
    "exporting",
    "is_exporting",
    "cosine_distance",
    "cosine_distance_reference",
    "cosine_distance_map",
    "cosine_distance_map_reference",
    "gaussian_blur_reference",
    "gaussian_kernel1d",
    "local_attention",
    "local_attention_reference",
    "window_mask",
    "knn",
    "knn_reference",
    "memory_entropy_loss",
    "memory_read",
    "memory_read_reference",
]
