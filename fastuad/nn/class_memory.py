"""Per-class memories of stored (not learned) teacher features, as DM-GRD and MDD-Net use them.

:class:`ClassFeatureMemory` keeps, for each of ``K`` classes, ``N`` items: the multi-level
feature maps of ``N`` images (``maps[l]: [K, N, C_l, H_l, W_l]``) and one key per item, the
concatenation of its per-level, L2-normalised, globally average-pooled features
(``keys: [K, N, D]``, ``D = sum(C_l)``). The cosine between two such keys is the mean over
levels of the per-level pooled cosine, so

* :meth:`match` picks, within the query's class, the item with the highest pooled cosine
  similarity (read through :func:`fastuad.ops.memory_read` with ``class_index``; the argmax of
  its softmax weights is the argmax of the cosine), and
* :meth:`infer_class` names the class of the nearest item over all classes
  (:func:`fastuad.ops.knn` on unit keys: the smallest Euclidean distance is the largest cosine),
  which is how a multi-class model finds a test image's class.

Everything is a buffer: ``state_dict`` saves it, and loading resizes the buffers to the saved
shapes, so a checkpoint restores a filled memory into a freshly built, empty model.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastuad.ops.knn_search import knn
from fastuad.ops.memory import memory_read

__all__ = ["ClassFeatureMemory", "pooled_keys"]


def pooled_keys(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, sum C_l]``: per level global average pool, L2-normalised, concatenated."""
    return torch.cat([F.normalize(f.float().mean(dim=(2, 3)), dim=1) for f in feats], dim=1)


class ClassFeatureMemory(nn.Module):
    """``K`` classes x ``N`` items of stored multi-level feature maps with pooled keys.

    Args:
        channels: the channel count of each level.
        store_maps: keep the full feature maps (DM-GRD needs them for the difference to the
            best match); ``False`` keeps only the keys (enough for class inference).
        dtype: storage dtype of the maps (float16 halves a large memory; keys stay float32).
    """

    def __init__(self, channels: Sequence[int], store_maps: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.store_maps = bool(store_maps)
        self.dtype = dtype
        self.register_buffer("keys", torch.empty(0, 0, sum(self.channels)))
        for level, c in enumerate(self.channels):
            self.register_buffer(f"maps_{level}", torch.empty(0, 0, c, 0, 0, dtype=dtype) if store_maps else None)

    @property
    def num_classes(self) -> int:
        return self.keys.shape[0]

    @property
    def num_items(self) -> int:
        return self.keys.shape[1]

    @property
    def filled(self) -> bool:
        return self.keys.numel() > 0

    def maps(self, level: int) -> torch.Tensor:
        return getattr(self, f"maps_{level}")

    @torch.no_grad()
    def fill(self, feats: Sequence[torch.Tensor]) -> None:
        """Store ``feats[l]: [K, N, C_l, H_l, W_l]`` (every class the same ``N`` items)."""
        if len(feats) != len(self.channels):
            raise ValueError(f"feats must hold {len(self.channels)} levels, got {len(feats)}")
        k, n = feats[0].shape[:2]
        for level, (f, c) in enumerate(zip(feats, self.channels)):
            if f.dim() != 5 or f.shape[:3] != (k, n, c):
                raise ValueError(f"feats[{level}] must be [K={k}, N={n}, C={c}, H, W], got {tuple(f.shape)}")
        flat = [f.flatten(0, 1) for f in feats]
        self.keys = pooled_keys(flat).view(k, n, -1).to(self.keys.device).contiguous()
        if self.store_maps:
            for level, f in enumerate(feats):
                setattr(self, f"maps_{level}", f.detach().to(device=self.keys.device, dtype=self.dtype).contiguous())

    def match(self, query_keys: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
        """Index ``[B]`` of the item of class ``class_index[b]`` with the highest pooled cosine."""
        _, weights = memory_read(query_keys.float(), self.keys, class_index, similarity="cosine", return_weights=True)
        return weights.argmax(dim=1)

    def gather(self, class_index: torch.Tensor, item: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """The stored maps of item ``item[b]`` of class ``class_index[b]``, per level ``[B, C, H, W]``."""
        return [self.maps(level)[class_index, item].to(dtype) for level in range(len(self.channels))]

    def gather_keys(self, class_index: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.keys[class_index, item]

    def infer_class(self, query_keys: torch.Tensor) -> torch.Tensor:
        """Class ``[B]`` (int64) of the nearest stored item over all classes."""
        _, index = knn(query_keys.float().contiguous(), self.keys.flatten(0, 1), k=1)
        return index[:, 0] // self.num_items

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and buf is not None and saved.dim() == buf.dim():
                self._buffers[name] = torch.empty_like(saved, device=buf.device, dtype=buf.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, classes={self.num_classes}, items={self.num_items}, store_maps={self.store_maps}"
