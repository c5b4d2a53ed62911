"""bench/offload.py --tiny runs the GPU comparison on CPU at toy size (torchao skipped: its
offload needs CUDA), so the bench cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.runs import REPO


@pytest.mark.slow
def test_offload_bench_tiny_runs(tmp_path):
    out = tmp_path / "tiny.json"
    done = subprocess.run([sys.executable, "bench/offload.py", "--tiny", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["rows"]] == ["none", "host_all", "interleaved"]
    assert all(r["s_per_step"] > 0 and r["batch"] == 2 for r in report["rows"])
    assert set(report["skipped"]) == {"torchao"} and "needs CUDA" in done.stdout
    assert isinstance(report["host_adamw_elements_per_s"]["torch"], float)
    assert "no accelerator, host and device are both the CPU" in done.stdout and "s/step / interleaved" in done.stdout
