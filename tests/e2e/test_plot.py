"""`python -m pretrain.plot`: the curves of two runs in one image; bad input is one line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from pretrain.plot import smoothed
from tests.runs import assert_one_error, cli

pytestmark = pytest.mark.slow  # seconds each (subprocess runs): CI runs them, the fast loop skips them


def write_run(run_dir: Path, lr: float, steps: int = 60) -> Path:
    """A metrics.jsonl as a run writes it: a falling loss, evaluation every 20 steps, one
    diverged step (nulls) and a last line cut short."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        loss = 5.8 * math.exp(-step * lr) + 1.5 + 0.1 * math.sin(step)
        record = {"step": step, "loss": loss, "lr": lr * min(1, step / 10), "grad_norm": 1 / step, "tokens_per_s": 1000 + step}
        if step == 30:
            record |= {"loss": None, "grad_norm": None, "skipped": True}
        if step % 20 == 0:
            record |= {"eval_loss": loss + 0.1, "eval_ppl": math.exp(loss + 0.1)}
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 61, "lo')
    return run_dir


def test_two_runs_are_drawn_into_one_image(tmp_path):
    runs = [write_run(tmp_path / "lr-0.05", 0.05), write_run(tmp_path / "lr-0.1", 0.1)]
    output = tmp_path / "plots" / "curves.png"
    result = cli("pretrain.plot", *map(str, runs), "--output", str(output))
    assert result.returncode == 0 and result.stdout == f"wrote {output}\n", result.stderr
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(output)
    assert image.shape[:2] == (960, 1536)  # 2 x 2 panels at 120 dpi
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 50  # curves, not a blank canvas
    one = cli("pretrain.plot", str(runs[0]), "--metric", "loss", "--smooth", "0", "--output", str(tmp_path / "loss.svg"))
    assert one.returncode == 0 and (tmp_path / "loss.svg").read_text().lstrip().startswith("<?xml")


def test_bad_input_is_one_line(tmp_path):
    run = write_run(tmp_path / "run", 0.05)
    assert_one_error(cli("pretrain.plot", str(tmp_path), "--output", str(tmp_path / "x.png")), f"{tmp_path} has no metrics.jsonl")
    assert_one_error(cli("pretrain.plot", str(run), "--metric", "los", "--output", str(tmp_path / "x.png")), "--metric los: no run logged it")
    assert_one_error(cli("pretrain.plot", str(run), "--smooth", "1", "--output", str(tmp_path / "x.png")), "--smooth must be in [0, 1) (got 1.0)")
    assert not (tmp_path / "x.png").exists()


def test_smoothing_is_debiased():
    assert smoothed([2.0, 2.0, 2.0], 0.9) == [2.0, 2.0, 2.0]
    assert smoothed([1.0, 3.0], 0.0) == [1.0, 3.0]
