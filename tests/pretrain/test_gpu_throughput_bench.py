"""bench/gpu_throughput.py --tiny runs on CPU (the compiled variant is left to test_compile.py,
since compiling takes a minute on CPU), so the bench cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.runs import REPO


@pytest.mark.slow
def test_gpu_throughput_tiny_runs(tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "bench/gpu_throughput.py", "--tiny", "--steps", "1", "--warmup", "1",
           "--only", "fla_gdn,ebb_G,ebb_hybrid,ebb_mamba2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["rows"]] == ["ebb_G", "ebb_hybrid", "ebb_mamba2"]
    assert all(r["tokens_per_s"] > 0 and r["mfu_6n"] is not None for r in report["rows"])
    assert set(report["skipped"]) == {"fla_gdn"} and "fla_gdn" in done.stdout and "skipped" in done.stdout
    assert "ebb: ops: PyTorch for every mixer (device cpu)" in done.stdout
