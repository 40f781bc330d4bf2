"""Training recipes: the optimiser, schedule and budget a model is trained with.

A model may carry a ``recipe`` attribute (a :class:`TrainRecipe`); the engine trains with it
unless the user overrides ``lr``, ``epochs`` or ``batch_size``. ``preset="paper"`` models carry
their authors' recipe, so ``fastuad train --preset paper`` reproduces the paper's set-up.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch

from fastuad.errors import FastUADError

__all__ = ["TrainRecipe", "RecipeError", "build_optimizer", "build_scheduler"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")


class RecipeError(FastUADError, ValueError):
    """A recipe with an unknown optimiser or schedule or an out-of-range number."""


@dataclasses.dataclass
class TrainRecipe:
    """How to train a model.

    ``schedule``: ``constant``; ``cosine`` (decay to 0 over the run after ``warmup_steps`` of
    linear warm-up); ``step`` (multiply the rate by ``gamma`` at each epoch in ``milestones``).
    ``grad_clip``: clip the global gradient norm to this value (``None``: no clipping).
    """

    optimizer: str = "adam"
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 16
    grad_clip: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise RecipeError(f"recipe optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"recipe schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.lr > 0 or self.epochs < 1 or self.batch_size < 1:
            raise RecipeError(f"recipe needs lr > 0, epochs >= 1 and batch_size >= 1, got {self.lr}, {self.epochs}, {self.batch_size}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise RecipeError(f"recipe grad_clip must be positive or None, got {self.grad_clip!r}")

    def replace(self, **changes) -> "TrainRecipe":
        """A copy with ``changes`` applied; ``None`` values are ignored (no override)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        """Plain containers only (checkpoints load with ``weights_only=True``)."""
        d = dataclasses.asdict(self)
        d["betas"], d["milestones"] = list(self.betas), list(self.milestones)
        return d


def build_optimizer(params: Iterable[torch.nn.Parameter], recipe: TrainRecipe) -> torch.optim.Optimizer:
    """The optimiser the recipe names, over ``params``."""
    params = list(params)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.betas[0], weight_decay=recipe.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: TrainRecipe, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step learning-rate schedule (``scheduler.step()`` after every optimiser step)."""
    total = max(1, recipe.epochs * steps_per_epoch)
    warm = max(0, recipe.warmup_steps)
    milestones = [m * steps_per_epoch for m in recipe.milestones]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if recipe.schedule == "cosine":
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if recipe.schedule == "step":
            return recipe.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
