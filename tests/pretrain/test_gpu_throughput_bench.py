"""bench/gpu_throughput.py --tiny runs on CPU (the compiled variant is left to test_compile.py,
since compiling takes a minute on CPU), and so does bench/gpu_startup.py --tiny, so the benches cannot rot."""
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


@pytest.mark.slow
def test_gpu_startup_tiny_runs_a_fresh_process_with_an_empty_triton_cache(tmp_path):
    """bench/gpu_startup.py --tiny: the variant's own process, timed from its spawn to its first step, in the
    cold cache it was given; a cache that is not empty is refused, since a fresh machine has none."""
    out, cold = tmp_path / "startup.json", tmp_path / "cold"
    cmd = [sys.executable, "bench/gpu_startup.py", "--tiny", "--variants", "without", "--cold-cache", str(cold), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["variant"] == "without" and 0 < row["build_s"] < row["to_first_step_s"] and row["first_step_s"] > 0
    assert f"TRITON_CACHE_DIR={cold}" in done.stdout and "ebb: ops: PyTorch for every mixer (device cpu)" in done.stdout
    cold.mkdir(exist_ok=True)
    (cold / "x").write_text("")
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip() == f"error: --cold-cache {cold} is not empty: a fresh machine's start-up needs an empty Triton cache"
