"""bench/checkpoint_stall.py --tiny runs every measurement at toy size (each mode, offload off and
on, lazy with and without staging slots), so the bench cannot rot."""
from __future__ import annotations

import pytest

from tests.runs import run_bench


@pytest.mark.slow
def test_checkpoint_stall_bench_tiny_runs(tmp_path):
    report, printed = run_bench("checkpoint_stall", "--tiny", out=tmp_path / "tiny.json", timeout=300)
    rows = ["torch.save", "sync", "async", "lazy", "torch.save offload", "sync offload", "async offload", "lazy offload, staging 0", "lazy offload, staging 2"]
    assert list(report["stall_s"]) == rows and all(report["flush_s"][r] > 0 and report["stall_vs_commit"][r] > 0 for r in rows)
    assert list(report["e2e_ratio"]) == ["lazy", "lazy offload, staging 0", "lazy offload, staging 2"]
    assert all(report["e2e_ratio"][k] > 0 and report["e2e_paired_median"][k] > 0 for k in report["e2e_ratio"]) and report["offloaded_moments_gb"] > 0
    assert "stall / commit" in printed and "end to end, lazy offload, staging 2: every 2 steps" in printed
