"""bench/checkpoint_stall.py --tiny runs every measurement at toy size (each mode, offload off and
on, lazy with and without staging slots), so the bench cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.runs import REPO


@pytest.mark.slow
def test_checkpoint_stall_bench_tiny_runs(tmp_path):
    out = tmp_path / "tiny.json"
    done = subprocess.run([sys.executable, "bench/checkpoint_stall.py", "--tiny", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = ["torch.save", "sync", "async", "lazy", "torch.save offload", "sync offload", "async offload", "lazy offload, staging 0", "lazy offload, staging 2"]
    assert list(report["stall_s"]) == rows and all(report["flush_s"][r] > 0 and report["stall_vs_commit"][r] > 0 for r in rows)
    assert list(report["e2e_ratio"]) == ["lazy", "lazy offload, staging 0", "lazy offload, staging 2"]
    assert all(report["e2e_ratio"][k] > 0 and report["e2e_paired_median"][k] > 0 for k in report["e2e_ratio"]) and report["offloaded_moments_gb"] > 0
    assert "stall / commit" in done.stdout and "end to end, lazy offload, staging 2: every 2 steps" in done.stdout
