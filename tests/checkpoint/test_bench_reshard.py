"""bench/reshard.py --tiny runs the whole measurement at toy size (2 gloo processes), so the bench
cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.runs import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_reshard_bench_tiny_runs(tmp_path):
    out = tmp_path / "tiny.json"
    done = subprocess.run(
        [sys.executable, "bench/reshard.py", "--tiny", "--rounds", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["medians"]) == {"same", "changed"} and report["layouts"] == {"same": "dp_shard=2", "changed": "tp=2"}
    for key in ("load_s", "verify_s", "peak_mb", "load_peak_mb"):
        assert report["medians"]["same"][key] > 0 and report["ratios"][key] > 0, key
    assert report["optimizer_bytes"]["disk"] > 0 and report["optimizer_bytes"]["memory"] > 0
    assert "changed / same" in done.stdout and "on disk" in done.stdout
