"""bench/offload.py --tiny runs the GPU comparison on CPU at toy size (torchao skipped: its
offload needs CUDA), so the bench cannot rot."""
from __future__ import annotations

import pytest

from tests.runs import run_bench


@pytest.mark.slow
def test_offload_bench_tiny_runs(tmp_path):
    report, printed = run_bench("offload", "--tiny", out=tmp_path / "tiny.json", timeout=300)
    assert [r["variant"] for r in report["rows"]] == ["none", "host_all", "interleaved"]
    assert all(r["s_per_step"] > 0 and r["batch"] == 2 for r in report["rows"])
    assert set(report["skipped"]) == {"torchao"} and "needs CUDA" in printed
    assert isinstance(report["host_adamw_elements_per_s"]["torch"], float)
    assert "no accelerator, host and device are both the CPU" in printed and "s/step / interleaved" in printed
