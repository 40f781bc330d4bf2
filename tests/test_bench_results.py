"""The benchmark results file says which commit it measured (benchmarks/conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _bench_conftest():
    spec = importlib.util.spec_from_file_location("fastuad_bench_conftest", ROOT / "benchmarks" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_results_file_records_the_git_commit(tmp_path):
    conf = _bench_conftest()
    store = conf.ResultStore(records=[{"workload": "w", "case": "c", "backend": "torch", "median_s": 1.0}])
    path = tmp_path / "out" / "results.json"
    config = SimpleNamespace(getoption=lambda name, default=None: str(path), stash={conf.STORE_KEY: store})
    conf.pytest_sessionfinish(SimpleNamespace(config=config), 0)
    doc = json.loads(path.read_text())
    head = _git("rev-parse", "HEAD")
    if head.returncode == 0:  # a git checkout (CI is one): the exact commit, and the dirty flag
        assert doc["git_commit"] == head.stdout.strip()
        assert len(doc["git_commit"]) == 40
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        assert doc["git_dirty"] is dirty
    else:
        assert doc["git_commit"] is None and doc["git_dirty"] is None
    assert doc["environment"]["git_commit"] == doc["git_commit"]
    assert doc["records"] == store.records
