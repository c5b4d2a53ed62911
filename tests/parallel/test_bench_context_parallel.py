"""bench/context_parallel.py --tiny runs the whole measurement at toy size (1, 2 and 4 gloo
processes), so the bench cannot rot; its memory figures are sizes, not timings, so they are
checked: a rank at cp 4 saves less for backward than at cp 2, and that less than at cp 1, and
every block receives exchanges forward and backward."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models.mixers import PATTERN
from tests.runs import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_context_parallel_bench_tiny_runs(tmp_path):
    out = tmp_path / "tiny.json"
    done = subprocess.run(
        [sys.executable, "bench/context_parallel.py", "--tiny", "--reps", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["cp"] for row in rows] == [1, 2, 4]
    one, two, four = (row["activations_total"] for row in rows)
    assert four < two < one
    assert rows[0]["exchange_total"] == 0 and all(row["exchange_total"] > 0 for row in rows[1:])
    blocks = {f"{i} {name}" for i, name in enumerate(PATTERN.values())}
    for row in rows[1:]:
        assert {f"{block} {way}" for block in blocks for way in ("forward", "backward")} <= set(row["exchange"])
    assert "N x /cp1" in done.stdout and "bytes received in one forward and backward" in done.stdout
