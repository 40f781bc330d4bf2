"""An engine that never loses a run: checkpoint order, output folders, atomic writes, user errors
versus bugs, what ``--resume`` reports, images that stop decoding mid-run."""

import errno
import os

import pytest
import torch

import fastuad.engine as engine
from fastuad.cli import main
from fastuad.data import DataError, build_dataset, collate_skip_unreadable
from fastuad.engine import CheckpointWriteError, EngineError, _prune, save_checkpoint, train
from fastuad.errors import FastUADError
from fastuad.models import create_model
from fastuad.ops._dispatch import BackendUnavailableError
from test_engine import _cfg, _one_thread, tiny_root  # noqa: F401  (shared fixtures)


def test_prune_keeps_the_latest_epochs_by_number(tmp_path):
    for n in (998, 999, 1000, 1001):
        (tmp_path / f"epoch_{n:03d}.pt").write_bytes(b"x")
    (tmp_path / "last.pt").write_bytes(b"x")
    _prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1000.pt", "epoch_1001.pt", "last.pt"]
    _prune(tmp_path, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_an_output_folder_with_a_run_is_refused_unless_resume_or_overwrite(tiny_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # an older, longer run: its last.pt and a late epoch file
    (out / "last.pt").write_bytes(b"old run")
    (out / "epoch_005.pt").write_bytes(b"old epoch")
    with pytest.raises(EngineError, match=r"output folder .*run is not empty .*--resume.*--overwrite"):
        train(_cfg(tiny_root, out, evaluate=False))
    assert (out / "last.pt").read_bytes() == b"old run" and (out / "epoch_005.pt").read_bytes() == b"old epoch"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("mine")
    with pytest.raises(EngineError, match="readme.txt"):  # any file counts, not only checkpoints
        train(_cfg(tiny_root, tmp_path / "notes", evaluate=False))

    result = train(_cfg(tiny_root, out, evaluate=False, overwrite=True))
    # the old run's later epoch must not survive pruning in place of the new run's
    assert sorted(p.name for p in out.iterdir()) == ["epoch_001.pt", "last.pt"]
    assert torch.load(result["checkpoint"], weights_only=True)["epoch"] == 1


def test_cli_overwrite_flag(tiny_root, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["train", "--model", "rd4ad", "--dataset", "mvtec", "--data-root", str(tiny_root), "--epochs", "1",
            "--batch-size", "4", "--image-size", "64", "--out", str(out), "--no-progress", "--no-eval"]
    out.mkdir()
    (out / "epoch_007.pt").write_bytes(b"old")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty" in err
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["epoch_001.pt", "last.pt"]


def _small_model():
    return create_model("rd4ad", image_size=64)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = _small_model()
    path = save_checkpoint(tmp_path / "last.pt", model, None, 1)
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(engine.torch, "save", disk_full)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(path, model, None, 2)
    assert str(path) in str(info.value) and "No space left on device" in str(info.value)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, FastUADError) and isinstance(info.value, OSError)
    assert path.read_bytes() == before  # the previous checkpoint is intact ...
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # ... and no temporary file is left
    monkeypatch.setattr(engine.torch, "save", real_save)
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_checkpoint_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(engine.os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(engine.os, "replace", lambda a, b: (events.append(("replace", os.path.basename(b))), real_replace(a, b)))
    save_checkpoint(tmp_path / "last.pt", _small_model(), None, 1)
    # the file's data is on disk before the rename makes it visible; then the folder entry too
    assert events[:2] == [("fsync", False), ("replace", "last.pt")]
    assert ("fsync", True) in events[2:]
    (tmp_path / "b.pt").write_bytes(b"")
    save_checkpoint(tmp_path / "b.pt", _small_model(), None, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt", "last.pt"]


def test_cli_prints_user_errors_in_one_line_and_bugs_with_a_traceback(tiny_root, tmp_path, capsys, monkeypatch):
    args = ["train", "--model", "rd4ad", "--dataset", "mvtec", "--data-root", str(tiny_root), "--out", str(tmp_path / "o"), "--no-progress"]

    def fails_with(exc):
        def fake_train(cfg):
            raise exc
        monkeypatch.setattr(engine, "train", fake_train)

    # user-facing errors of every kind: one line, exit code 2
    for exc, text in [
        (BackendUnavailableError("backend 'cuda' cannot run: no GPU"), "backend 'cuda' cannot run"),
        (DataError("dataset root /x does not exist"), "dataset root /x"),
        (CheckpointWriteError("cannot write checkpoint /o/last.pt: No space left on device"), "/o/last.pt"),
    ]:
        fails_with(exc)
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"fastuad: error: {exc}" and text in err
    # a bug is not a user error, even when it is a ValueError, OSError or IndexError
    for exc in (ValueError("shape mismatch in a matmul"), OSError("[Errno 5] I/O error"), IndexError("list index out of range")):
        fails_with(exc)
        with pytest.raises(type(exc)):
            main(args)
    assert issubclass(DataError, ValueError) and issubclass(DataError, FastUADError)

    # a user path that cannot be written is wrapped where it is used: one line naming it
    import fastuad.data.demo as demo

    def read_only(root, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(root))

    monkeypatch.setattr(demo, "make_demo_dataset", read_only)
    assert main(["demo", "--out", str(tmp_path / "ro"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fastuad: error: cannot write the demo data set under {tmp_path / 'ro'}: Permission denied"


def test_cli_reports_the_epochs_a_resumed_run_trained(tiny_root, tmp_path, capsys):
    args = ["train", "--model", "rd4ad", "--dataset", "mvtec", "--data-root", str(tiny_root), "--batch-size", "4",
            "--image-size", "64", "--out", str(tmp_path / "o"), "--no-progress", "--no-eval"]
    assert main([*args, "--epochs", "1"]) == 0
    assert "trained 1 epoch in" in capsys.readouterr().out
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "trained 1 epoch in" in out and "resumed after epoch 1; 2 of 2 done" in out
    assert main([*args, "--epochs", "1", "--resume"]) == 0  # already past the asked epochs
    out = capsys.readouterr().out
    assert "trained 0 epochs in" in out and "nothing to train" in out


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_image_that_stops_decoding_mid_run_is_skipped_with_a_warning(tiny_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    ds = build_dataset("mvtec", root, "train", image_size=64)
    n = len(ds)
    bad = root / "brick" / "train" / "good" / "001.png"
    _truncate(bad)  # damaged after the index was built (passed the header check)
    index = [s.path for s in ds.samples].index(bad)
    with pytest.warns(UserWarning, match=str(bad)):
        assert ds[index] is None
    assert ds[(index + 1) % n] is not None
    with pytest.warns(UserWarning, match=str(bad)):
        batch = collate_skip_unreadable([ds[i] for i in range(n)])
    assert batch["image"].shape[0] == n - 1 and str(bad) not in batch["path"]
    assert collate_skip_unreadable([None, None]) is None

    # the engine trains and evaluates through it
    with pytest.warns(UserWarning, match=str(bad)):
        result = train(_cfg(root, tmp_path / "run", batch_size=2))
    assert len(result["history"]) == 1 and result["history"][0] == result["history"][0]  # a finite loss
    test_set = build_dataset("mvtec", root, "test", image_size=64)
    test_bad = root / "coffee" / "test" / "good" / "000.png"
    _truncate(test_bad)
    model = engine.load_checkpoint(result["checkpoint"])[0]
    with pytest.warns(UserWarning, match=str(test_bad)):
        metrics = engine.evaluate(model, test_set, progress=False)
    assert sorted(metrics["per_class"]) == ["brick", "coffee"]
