"""Distributed training on CPU with Gloo: 2 processes match one process on the same global batch,
write one set of checkpoints, resume, and share PatchCore's bank; ``torchrun -m fastuad`` works."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fastuad.engine import TrainConfig, load_checkpoint, train
from fastuad.models import TrainRecipe, register_model
from test_engine import _one_thread, tiny_root  # noqa: F401  (shared fixtures)

TINY = "_test_ddp_tiny"


class TinyReconstructor(nn.Module):
    """Two convolutions that rebuild the image: trainable, no batch statistics (no BatchNorm)."""

    def __init__(self, image_size: int = 64, config: dict | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
        self.recipe = TrainRecipe(optimizer="adam", lr=1e-2, epochs=1, batch_size=4)
        self.config = dict(config or {})

    def training_loss(self, batch: dict) -> torch.Tensor:
        return F.mse_loss(self.net(batch["image"]), batch["image"])

    def forward(self, images: torch.Tensor):
        amap = (self.net(images) - images).pow(2).mean(dim=1, keepdim=True)
        return amap, amap.flatten(1).amax(dim=1)


@register_model(name=TINY)
def _tiny(backbone=None, image_size: int = 64, weights=None, **kw) -> TinyReconstructor:
    return TinyReconstructor(image_size, config={"name": TINY, "backbone": "none", "image_size": image_size})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfgs: list, report: str) -> None:
    """One rank: the environment torchrun would set, then every config in turn; writes what it saw."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    seen = []
    for cfg in cfgs:
        result = train(cfg)
        seen.append({k: result.get(k) for k in ("rank", "world_size", "start_epoch", "epochs_run", "history")} | {"metrics": "metrics" in result})
    Path(report, f"rank{rank}.json").write_text(json.dumps(seen))


def _cfg(root, out, **kw):
    base = dict(model=TINY, dataset="mvtec", data_root=str(root), out=str(out), image_size=64, progress=False, evaluate=True)
    return TrainConfig(**{**base, **kw})


def test_two_gloo_processes_match_one_process_and_resume(tiny_root, tmp_path):
    # 8 training images, global batch 4: 2 steps per epoch; 2 ranks x 2 images per step
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    cfgs = [_cfg(tiny_root, ddp_out, epochs=1), _cfg(tiny_root, ddp_out, epochs=2, resume=True)]
    procs = mp.start_processes(_worker, args=(2, _free_port(), cfgs, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 600
    while not procs.join(timeout=5):  # never hang CI: a stuck process group fails the test instead
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the 2-process Gloo run did not finish within 600 s")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # rank 0 alone evaluates; both see the same epochs and the same (all-reduced) losses
    assert [run["metrics"] for run in ranks[0]] == [True, True] and [run["metrics"] for run in ranks[1]] == [False, False]
    assert [(run["start_epoch"], run["epochs_run"]) for run in ranks[1]] == [(0, 1), (1, 1)]  # every rank resumed
    assert ranks[0][1]["history"] == ranks[1][1]["history"]
    assert sorted(p.name for p in ddp_out.iterdir()) == ["epoch_002.pt", "last.pt"]  # one set of checkpoints

    one = train(_cfg(tiny_root, single_out, epochs=1, evaluate=False))
    ddp_epoch1 = ranks[0][0]["history"][0]
    assert ddp_epoch1 == pytest.approx(one["history"][0], rel=1e-5)
    train(_cfg(tiny_root, single_out, epochs=2, resume=True, evaluate=False))
    a = torch.load(ddp_out / "last.pt", weights_only=True)
    b = torch.load(single_out / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["train"]["world_size"] == 2
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, atol=1e-5, rtol=1e-4)
    # and the weights moved: the comparison is not between two untouched initialisations
    torch.manual_seed(0)
    init = TinyReconstructor().state_dict()
    assert set(init) == set(a["model"]) and all(not torch.allclose(v, a["model"][k], atol=1e-3) for k, v in init.items())


def test_torchrun_trains_patchcore_with_one_bank(tiny_root, tmp_path):
    """``python -m torch.distributed.run --nproc_per_node 2 -m fastuad train``: rank 0 builds the bank
    over the whole set, the other rank receives it; one set of checkpoints; the bank equals one
    process's."""
    out = tmp_path / "pc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "fastuad", "train", "--model", "patchcore", "--dataset", "mvtec",
           "--data-root", str(tiny_root), "--image-size", "64", "--batch-size", "4", "--out", str(out), "--no-progress",
           "--device", "cpu", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 1 epoch") == 1 and proc.stdout.count("i_auroc") == 1  # rank 0 reports
    assert sorted(p.name for p in out.iterdir()) == ["epoch_001.pt", "last.pt"]
    ddp_model, ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["train"]["world_size"] == 2
    single = train(TrainConfig(model="patchcore", dataset="mvtec", data_root=str(tiny_root), out=str(tmp_path / "one"),
                               image_size=64, batch_size=4, progress=False, evaluate=False))
    one_model, _ = load_checkpoint(single["checkpoint"])
    torch.testing.assert_close(ddp_model.bank.features, one_model.bank.features)
