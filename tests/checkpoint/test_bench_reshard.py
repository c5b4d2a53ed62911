"""bench/reshard.py --tiny runs the whole measurement at toy size (2 gloo processes), so the bench
cannot rot."""
from __future__ import annotations

import pytest

from tests.runs import run_bench

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_reshard_bench_tiny_runs(tmp_path):
    report, printed = run_bench("reshard", "--tiny", "--rounds", "1", out=tmp_path / "tiny.json")
    assert set(report["medians"]) == {"same", "changed"} and report["layouts"] == {"same": "dp_shard=2", "changed": "tp=2"}
    for key in ("load_s", "verify_s", "peak_mb", "load_peak_mb"):
        assert report["medians"]["same"][key] > 0 and report["ratios"][key] > 0, key
    assert report["optimizer_bytes"]["disk"] > 0 and report["optimizer_bytes"]["memory"] > 0
    assert "changed / same" in printed and "on disk" in printed
