"""bench/loss_memory.py runs, one process, --tp 2 (gloo) and --pp-stage, so the bench cannot rot:
the chunked loss holds less than the full logits and gives the same loss."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.runs import REPO


def run_bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "bench/loss_memory.py", *args, "--out", str(tmp_path / "loss_memory.json")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_one_process_meta_count_is_the_real_one(tmp_path):
    run_bench(tmp_path, "--vocab", "2048", "--tokens", "4096", "--hidden", "32", "--real-tokens", "512")
    rows = json.loads((tmp_path / "loss_memory.json").read_text())
    meta, real = (next(r for r in rows if r["device"] == d and r["tokens"] == 512) for d in ("meta", "cpu"))
    assert (meta["full_peak_bytes"], meta["chunked_peak_bytes"]) == (real["full_peak_bytes"], real["chunked_peak_bytes"])
    assert all(r["chunked_peak_bytes"] < r["full_peak_bytes"] for r in rows)


@pytest.mark.distributed
def test_tensor_parallel_mode(tmp_path):
    run_bench(tmp_path, "--tp", "2", "--vocab", "2048", "--tokens", "1024", "--hidden", "32")
    row = json.loads((tmp_path / "loss_memory_tp.json").read_text())
    assert row["chunked_peak_bytes"] < row["full_peak_bytes"]
    assert abs(row["loss_chunked"] - row["loss_full"]) <= 1e-5 * abs(row["loss_full"])


@pytest.mark.slow
def test_pipeline_stage_mode(tmp_path):
    run_bench(tmp_path, "--pp-stage", "--vocab", "2048", "--tokens", "512", "--hidden", "64")
    row = json.loads((tmp_path / "loss_memory_pp.json").read_text())
    assert row["chunked_peak_bytes"] < row["full_peak_bytes"]
    assert abs(row["loss_chunked"] - row["loss_full"]) <= 1e-5 * abs(row["loss_full"])
