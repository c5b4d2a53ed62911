"""bench/context_parallel.py --tiny runs the whole measurement at toy size (1, 2 and 4 gloo
processes), so the bench cannot rot; its memory figures are sizes, not timings, so they are
checked: a rank at cp 4 saves less for backward than at cp 2, and that less than at cp 1, and
every block receives exchanges forward and backward."""
from __future__ import annotations

import pytest

from models.mixers import PATTERN
from tests.runs import run_bench

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_context_parallel_bench_tiny_runs(tmp_path):
    report, printed = run_bench("context_parallel", "--tiny", "--reps", "1", out=tmp_path / "tiny.json")
    rows = report["rows"]
    assert [row["cp"] for row in rows] == [1, 2, 4]
    one, two, four = (row["activations_total"] for row in rows)
    assert four < two < one
    assert rows[0]["exchange_total"] == 0 and all(row["exchange_total"] > 0 for row in rows[1:])
    blocks = {f"{i} {name}" for i, name in enumerate(PATTERN.values())}
    for row in rows[1:]:
        assert {f"{block} {way}" for block in blocks for way in ("forward", "backward")} <= set(row["exchange"])
    assert "N x /cp1" in printed and "bytes received in one forward and backward" in printed
