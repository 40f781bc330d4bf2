"""Memory layers: a learnable addressed memory (MemAE / DualAD / MDD-Net) and a PatchCore bank.

* :class:`MemoryModule` holds learnable slots ``[M, D]`` (or one bank per class, ``[K, M, D]``)
  and reads them with :func:`fastuad.ops.memory_read`.
* :class:`MemoryBank` holds stored features ``[M, D]`` (e.g. normal patch features), can
  subsample them with PatchCore's greedy k-center coreset, and answers nearest-neighbour
  queries with :func:`fastuad.ops.knn_search`. The features are a buffer, so they are part of the
  ``state_dict`` and of every checkpoint; loading resizes the bank to the saved size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastuad.ops._dispatch import check_backend_name
from fastuad.ops.knn_search import bank_sq_norms, knn
from fastuad.ops.memory import SIMILARITIES, memory_read

__all__ = ["MemoryModule", "MemoryBank", "k_center_greedy"]


class MemoryModule(nn.Module):
    """Learnable memory read by soft addressing with hard shrinkage.

    Args:
        num_slots: ``M``, the number of memory items (DualAD: 196).
        dim: ``D``, the feature width of a slot (DualAD: 256).
        num_classes: ``K`` for class-aware memory (one bank per product class, selected by the
            ``class_index`` given to :meth:`forward`); ``None`` for one shared bank.
        shrink_threshold: MemAE's ``λ`` in ``[0, 1)``; ``None`` means ``1/num_slots`` (DualAD).
        temperature: softmax temperature ``T > 0``.
        similarity: ``"cosine"`` or ``"dot"``.
        backend: passed to :func:`fastuad.ops.memory_read`.

    Slots are initialised uniformly in ``±1/sqrt(D)``, as in MemAE.
    """

    def __init__(
        self,
        num_slots: int,
        dim: int,
        num_classes: int | None = None,
        shrink_threshold: float | None = None,
        temperature: float = 1.0,
        similarity: str = "cosine",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("num_slots", num_slots), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        lam = 1.0 / num_slots if shrink_threshold is None else float(shrink_threshold)
        if not 0.0 <= lam < 1.0:
            raise ValueError(f"shrink_threshold must lie in [0, 1), got {shrink_threshold!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        check_backend_name(backend)
        self.num_slots, self.dim, self.num_classes = num_slots, dim, num_classes
        self.shrink_threshold = lam
        self.temperature = float(temperature)
        self.similarity = similarity
        self.backend = backend
        shape = (num_slots, dim) if num_classes is None else (num_classes, num_slots, dim)
        self.memory = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.memory, -bound, bound)

    def forward(self, x: torch.Tensor, class_index: torch.Tensor | None = None, return_weights: bool = False):
        """Read the memory with ``x [..., D]``; returns ``[..., D]`` (and weights ``[..., M]``).

        ``class_index`` (class-aware memory only) is one int64 class per row of ``x`` (shape
        ``x.shape[:-1]``), or one per sample (shape ``[B]``) broadcast over the other leading dims.
        """
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [..., {self.dim}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        if class_index is not None and self.num_classes is not None:
            if not isinstance(class_index, torch.Tensor):
                raise TypeError(f"class_index must be a torch.Tensor, got {type(class_index).__name__}")
            if class_index.dim() == 1 and len(lead) > 1 and class_index.shape[0] == lead[0]:
                class_index = class_index.view(-1, *([1] * (len(lead) - 1))).expand(lead)
            if tuple(class_index.shape) != tuple(lead):
                raise ValueError(f"class_index must have shape {tuple(lead)} or [{lead[0] if lead else 1}], got {tuple(class_index.shape)}")
            class_index = class_index.reshape(-1)
        elif class_index is not None:
            raise ValueError("class_index is only used by a class-aware MemoryModule (num_classes set)")
        memory = self.memory if self.memory.dtype == flat.dtype else self.memory.to(flat.dtype)
        result = memory_read(
            flat,
            memory,
            class_index,
            similarity=self.similarity,
            temperature=self.temperature,
            shrink_threshold=self.shrink_threshold,
            return_weights=return_weights,
            backend=self.backend,
        )
        if return_weights:
            out, w = result
            return out.reshape(*lead, self.dim), w.reshape(*lead, self.num_slots)
        return result.reshape(*lead, self.dim)

    def extra_repr(self) -> str:
        classes = f", num_classes={self.num_classes}" if self.num_classes is not None else ""
        return (
            f"num_slots={self.num_slots}, dim={self.dim}{classes}, shrink_threshold={self.shrink_threshold:.4g}, "
            f"temperature={self.temperature}, similarity={self.similarity!r}"
        )


def k_center_greedy(
    features: torch.Tensor, num_samples: int, projection_dim: int | None = 128, seed: int = 0
) -> torch.Tensor:
    """PatchCore's greedy k-center coreset: indices ``[num_samples]`` (int64) into ``features``.

    Features ``[N, D]`` are first mapped by a seeded Gaussian random projection to
    ``projection_dim`` dims (``None`` or ``>= D``: no projection), as PatchCore does to make the
    selection cheap. Starting from a seeded random row, each step takes the row farthest from
    everything selected so far. Runs on the features' device without host synchronisation;
    ``O(num_samples · N · projection_dim)`` work. Besides the projected copy (none without
    projection for float32 features) it holds only ``O(N)`` vectors: each step is one
    matrix-vector product ``|x|² - 2 x·c + |c|²``, never an ``N×D`` difference or an ``N×M``
    distance matrix.
    """
    if features.dim() != 2:
        raise ValueError(f"features must have 2 dimensions [N, D], got shape {tuple(features.shape)}")
    n, d = features.shape
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 1 <= num_samples <= n:
        raise ValueError(f"num_samples must be an int in [1, N={n}], got {num_samples!r}")
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim is not None and projection_dim < d:
        proj = torch.randn(d, projection_dim, generator=gen) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    first = int(torch.randint(n, (1,), generator=gen))
    selected = torch.empty(num_samples, dtype=torch.int64, device=x.device)
    selected[0] = first
    sq = x.pow(2).sum(dim=1)  # [N]

    def sq_dist_to(c: torch.Tensor) -> torch.Tensor:  # [N], no [N, D] temporary
        return (sq - 2.0 * (x @ x[c]) + sq[c]).clamp_min_(0.0)

    min_dist = sq_dist_to(torch.tensor(first, device=x.device))
    for i in range(1, num_samples):
        nxt = torch.argmax(min_dist)
        selected[i] = nxt
        torch.minimum(min_dist, sq_dist_to(nxt), out=min_dist)
    return selected


class MemoryBank(nn.Module):
    """A bank of stored features ``[M, D]`` searched by exact k-NN (PatchCore scoring).

    Args:
        dim: feature width ``D``.
        backend: passed to :func:`fastuad.ops.knn_search`.

    ``fit(features, coreset_ratio)`` stores (a coreset of) the features; ``forward(query, k)``
    returns ``(dist [N, k], index [N, k])``. The bank is a buffer: ``state_dict`` saves it and
    ``load_state_dict`` restores it at its saved size. Its squared row norms are a second buffer
    ``sq_norms`` (float32; float64 for a float64 bank; not saved), computed once in :meth:`fit` (and on load) and handed to
    :func:`~fastuad.ops.knn` so that no search recomputes them over the whole bank.
    """

    def __init__(self, dim: int, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        check_backend_name(backend)
        self.dim = dim
        self.backend = backend
        self.register_buffer("features", torch.empty(0, dim))
        self.register_buffer("sq_norms", torch.empty(0), persistent=False)

    def __len__(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def fit(
        self,
        features: torch.Tensor,
        coreset_ratio: float = 1.0,
        projection_dim: int | None = 128,
        seed: int = 0,
    ) -> MemoryBank:
        """Store ``features [N, D]``; with ``coreset_ratio < 1`` keep a greedy k-center coreset
        of ``max(1, round(ratio·N))`` rows (PatchCore uses 0.1 or 0.01)."""
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != self.dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a tensor [N, {self.dim}], got {shape}")
        if features.shape[0] == 0:
            raise ValueError("features must hold at least one row")
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must lie in (0, 1], got {coreset_ratio!r}")
        if coreset_ratio < 1.0:
            num = max(1, round(coreset_ratio * features.shape[0]))
            features = features[k_center_greedy(features, num, projection_dim, seed)]
        self.features = features.detach().to(device=self.features.device, dtype=self.features.dtype).contiguous()
        self._refresh_norms()
        return self

    @torch.no_grad()
    def _refresh_norms(self) -> None:
        self.sq_norms = bank_sq_norms(self.features)

    def forward(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances ``[N, k]`` (ascending) and int64 indices of the ``k`` nearest stored rows."""
        if len(self) == 0:
            raise RuntimeError("MemoryBank is empty: call fit(features) first")
        bank = self.features if self.features.dtype == query.dtype else self.features.to(query.dtype)
        if self.sq_norms.shape != (len(self),) or self.sq_norms.device != bank.device:
            self._refresh_norms()  # features replaced or moved without fit()
        norms = self.sq_norms.to(torch.float64 if bank.dtype == torch.float64 else torch.float32)
        return knn(query, bank, k, backend=self.backend, bank_sq_norms=norms)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "features")
        if isinstance(saved, torch.Tensor) and saved.dim() == 2 and saved.shape[1] == self.dim:
            self.features = torch.empty_like(saved, device=self.features.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_norms()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={len(self)}"
