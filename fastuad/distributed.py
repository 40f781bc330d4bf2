"""Multi-process training helpers (``torchrun --nproc_per_node N -m fastuad train ...``).

``torchrun`` starts one process per GPU (or CPU worker) and sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`setup` joins the process group
(NCCL on CUDA, Gloo on CPU) when ``WORLD_SIZE > 1``; in a single process every helper here is
a no-op, so the engine runs the same code either way.

How the engine uses them:

- the gradient loop runs through ``DistributedDataParallel`` (gradients averaged over ranks);
  a ``DistributedSampler`` gives each rank its shard of every global batch;
- only rank 0 writes checkpoints, prints and evaluates; the others wait at :func:`barrier`;
- every rank resumes from the same ``last.pt``;
- a model's ``fit_memory`` hook (memories, PatchCore's bank) runs on rank 0 over the whole
  training set and :func:`broadcast_buffers` copies the buffers it filled (whatever their new
  size) to the other ranks. That is the simplest correct choice: every rank then holds exactly
  the memory a single process would build; the cost is that the other ranks idle meanwhile.
  Models that prefer to build from shards can use :func:`all_gather_tensors`.
"""

from __future__ import annotations

import dataclasses
import atexit
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "world", "setup", "teardown", "barrier", "broadcast_buffers", "all_gather_tensors", "all_reduce_sum"]


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place: ``size`` processes in all, this is ``rank`` (``local_rank`` on its node)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The world ``torchrun`` describes in the environment (one process when it does not)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)))
    size = int(os.environ.get("WORLD_SIZE", 1))
    return World(size, int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: torch.device) -> tuple[World, torch.device, bool]:
    """Join the process group when ``WORLD_SIZE > 1``: ``(world, this rank's device, joined here)``.

    On CUDA each process takes GPU ``LOCAL_RANK`` and NCCL; on CPU Gloo. ``joined here`` tells
    the caller to :func:`teardown` the group it created.
    """
    w = world()
    if not w.distributed:
        return w, device, False
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    joined = False
    if not dist.is_initialized():
        # generous timeout: the other ranks wait while rank 0 builds a bank or evaluates
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
        atexit.register(_destroy)
        joined = True
    return world(), device, joined


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def teardown(joined: bool) -> None:
    """End of a :func:`fastuad.engine.train` call: wait for every rank, keep the group.

    The group lives until the process exits (then it is destroyed). Destroying it here and
    joining again in a second ``train`` call of the same processes (train, then resume) reused
    the rendezvous store's keys of the first group: Gloo then waited forever for peers at the
    old group's addresses. One group per process avoids that.
    """
    if joined and dist.is_initialized():
        dist.barrier()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy every persistent buffer of ``model`` from rank ``src`` to the others, resizing as needed.

    Buffers go through ``broadcast_object_list`` (pickled on the CPU), so a bank that rank 0 has
    just filled reaches ranks that still hold an empty one.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = {name for name, _ in model.named_parameters()}
    if dist.get_rank() == src:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in params}
    else:
        state = None
    box = [state]
    dist.broadcast_object_list(box, src=src)
    if dist.get_rank() != src:
        model.load_state_dict(box[0], strict=False)


def all_gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (first dims may differ between ranks), in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [tensor]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, tensor.detach().cpu())
    return [t.to(tensor.device) for t in out]


def all_reduce_sum(*values: float) -> list[float]:
    """Sums of Python numbers over the ranks (the mean loss of an epoch over the whole set)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()
