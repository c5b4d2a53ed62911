"""End-to-end runs of `python -m pretrain.train` / `pretrain.generate` on a tiny hybrid, as subprocesses."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.metrics import EVAL_FIELDS, TRAIN_FIELDS
from tests.runs import REPO, SMALL_RUN, records

pytestmark = pytest.mark.slow  # seconds each (subprocess runs): CI runs them, the fast loop skips them


def run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


def train(run_dir: Path, *extra: str, resume: bool = False) -> subprocess.CompletedProcess:
    result = run("pretrain.train", *(["--resume"] if resume else []), *SMALL_RUN, f"train.run_dir={run_dir}", *extra)
    assert result.returncode == 0, result.stderr
    return result


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records(run_dir)]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("baseline")
    train(run_dir)
    return run_dir


def test_metrics_config_and_tensorboard_are_written(baseline):
    recs = records(baseline)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        assert set(TRAIN_FIELDS) <= r.keys()
        assert all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) for k in TRAIN_FIELDS)
        assert 0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
    evaluated = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    for r in evaluated:
        assert set(EVAL_FIELDS) <= r.keys() and r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]))
    assert recs[0]["loss"] == pytest.approx(math.log(320), abs=0.3)  # an untrained model is near-uniform
    assert list((baseline / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(baseline / "config.yaml").train.run_dir == str(baseline)


def test_keep_last_and_latest_after_a_run(baseline):
    ckpts = baseline / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000004", "step-00000006"]
    assert (ckpts / "latest").read_text().strip() == "step-00000006"


def test_resumed_run_matches_the_uninterrupted_one_step_for_step(baseline, tmp_path):
    first = train(tmp_path, "train.stop_at_step=3")
    assert "steps 1..3 of 6" in first.stdout
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
    second = train(tmp_path, resume=True)
    assert "steps 4..6 of 6" in second.stdout
    assert losses(tmp_path) == losses(baseline)  # exact: data position, RNG, optimizer and schedule restored


def test_same_seed_same_losses_other_seed_other_losses(baseline, tmp_path):
    train(tmp_path / "again")
    assert losses(tmp_path / "again") == losses(baseline)
    train(tmp_path / "other", "train.seed=1")
    assert losses(tmp_path / "other")[0][1] != losses(baseline)[0][1]


def test_generate_cli_prints_text_from_a_saved_run(baseline):
    for target in (baseline, baseline / "checkpoints" / "step-00000004"):
        result = run("pretrain.generate", "--checkpoint", str(target), "--prompt", "def f(", "--max-new-tokens", "8")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("def f(") and len(result.stdout) > len("def f(\n")


@pytest.mark.parametrize(
    "overrides, env, expected",
    [
        (["train.stepz=3"], {}, "unknown config key train.stepz (did you mean train.steps?)"),
        (["model.pattern=MX*"], {}, "unknown mixer character 'X'"),
        (["model.d_model=100", "model.mixers.attention.num_heads=3"], {}, "must be divisible by mixers.attention.num_heads"),
        (["data.path=/nonexistent/corpus.jsonl"], {}, "/nonexistent/corpus.jsonl"),
        (["--resume"], {}, "nothing to resume"),
        (["parallel.tp=3"], {}, "world size 1 is not divisible by pp*dp_replicate*tp = 3"),
    ],
)
def test_bad_runs_fail_with_one_line(tmp_path, overrides, env, expected):
    result = run("pretrain.train", *SMALL_RUN, f"train.run_dir={tmp_path}", *overrides, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert expected in result.stderr


def test_fresh_run_refuses_to_overwrite_checkpoints(baseline):
    result = run("pretrain.train", *SMALL_RUN, f"train.run_dir={baseline}")
    assert result.returncode == 2 and "already holds checkpoints" in result.stderr
    assert len(records(baseline)) == 6  # the earlier run's files are untouched
