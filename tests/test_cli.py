"""The ``fastuad`` command."""

import subprocess
import sys

import pytest

from fastuad.cli import main


def test_demo_prints_plan_and_runs_the_ops(capsys):
    assert main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "plan" in out and "anomaly map (2, 1, 128, 128)" in out


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fastuad" in out and "CUDA extension fastuad._C" in out


def test_unknown_command_fails_cleanly():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_console_entry_point_module():
    proc = subprocess.run([sys.executable, "-m", "fastuad", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("fastuad ")
