"""The `evaluation` section: downstream tasks run in the training loop give what
`pretrain.evaluate` gives on the same step's checkpoint, in one process and gathered from FSDP
and TP ranks; they leave training as it was; their metrics reach metrics.jsonl, TensorBoard and
`pretrain.plot`; a task that does not load stops the run before training; PP is refused."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.train import train
from tests.distributed import run_distributed
from tests.evaluation.helpers import TASKS, assert_one_error_line
from tests.runs import SMALL_RUN, layout_config, records

pytest.importorskip("lm_eval")  # in the dev extra: CI has it

EVALUATION = ["evaluation.tasks=[ebb_mc,ebb_ppl]", f"evaluation.include_path={TASKS}", "evaluation.limit=3", "evaluation.max_length=24"]


def downstream(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("downstream/")}


def scores_of_checkpoint(run_dir: Path, step: int, max_length: int = 24) -> dict:
    """`pretrain.evaluate` on the run's checkpoint of `step`, as metrics records."""
    from pretrain.evaluate import run
    from pretrain.evaluation.tasks import metric_record

    args = argparse.Namespace(
        checkpoint=run_dir / "checkpoints" / f"step-{step:08d}", tasks="ebb_mc,ebb_ppl", include_path=TASKS, limit=3, num_fewshot=None,
        batch_size=16, max_length=max_length, bootstrap_iters=0, device="cpu", dtype="float32", output=None, log_samples=False,
    )
    return metric_record(run(args))


def assert_same_scores(logged: dict, scored: dict, tol: float = 1e-6) -> None:
    assert logged.keys() == scored.keys() and {"downstream/ebb_mc/acc", "downstream/ebb_ppl/bits_per_byte"} <= logged.keys()
    for key, value in scored.items():
        assert math.isclose(logged[key], value, rel_tol=tol, abs_tol=tol), (key, logged[key], value)


@pytest.mark.slow
def test_tasks_in_the_loop_score_the_model_as_trained(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*SMALL_RUN, f"train.run_dir={run_dir}", "evaluation.interval=3", "logging.tensorboard=true", *EVALUATION])
    train(cfg, resume=False)
    logged = {r["step"]: downstream(r) for r in records(run_dir)}
    assert [step for step, scores in logged.items() if scores] == [3, 6]
    assert_same_scores(logged[6], scores_of_checkpoint(run_dir, 6))

    # training went on as it would have without the evaluations (its RNG streams and train mode kept)
    plain = tmp_path / "plain"
    train(load_config(None, [*SMALL_RUN, f"train.run_dir={plain}", "logging.tensorboard=false"]), resume=False)
    assert [r["loss"] for r in records(run_dir)] == [r["loss"] for r in records(plain)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("downstream/ebb_mc/acc")] == [3, 6]

    from pretrain.plot import downstream_metrics, load_runs
    from pretrain.plot import main as plot

    assert "downstream/ebb_ppl/bits_per_byte" in downstream_metrics(load_runs([run_dir]))
    assert plot([str(run_dir), "--output", str(tmp_path / "curves.png")]) == 0 and (tmp_path / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_task_that_does_not_load_stops_the_run_before_training(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from pretrain.train import main

    run_dir = tmp_path / "run"
    assert main([*SMALL_RUN, f"train.run_dir={run_dir}", "evaluation.tasks=[ebb_mc,ebb_missing]", f"evaluation.include_path={TASKS}"]) == 2
    assert_one_error_line(capfd.readouterr().err, "evaluation task 'ebb_missing' cannot be loaded: ")
    assert not (run_dir / "metrics.jsonl").exists() and not list(run_dir.rglob("step-*"))


def test_an_evaluation_that_fails_is_one_line() -> None:
    import torch

    from models.model import HybridLM
    from pretrain.errors import RunError
    from pretrain.evaluation.loop import start_downstream
    from pretrain.runtime import Runtime

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\nat some depth")

    cfg = load_config(None, [*EVALUATION, "evaluation.tasks=[ebb_mc]"])
    model = HybridLM(cfg.model)
    model.forward = broken
    downstream = start_downstream(cfg, Runtime(torch.device("cpu"), torch.float32), True, 1, None)
    with pytest.raises(RunError, match=r"^downstream evaluation failed: RuntimeError: out of memory \(evaluation.tasks"):
        downstream.run(model, True)
    assert model.training  # left as training had it


def test_pipeline_parallelism_refuses_the_tasks() -> None:
    with pytest.raises(ConfigError, match="evaluation.tasks is not supported with parallel.pp > 1"):
        load_config(None, ["parallel.pp=2", "model.pattern=GG", "evaluation.tasks=[hellaswag]"])
    with pytest.raises(ConfigError, match="evaluation.tasks: .*a task named twice"):
        load_config(None, ["evaluation.tasks=[arc_easy,arc_easy]"])


def train_rank(cfg) -> None:
    train(cfg, resume=False)


@pytest.mark.distributed
def test_sharded_runs_gather_the_model_for_the_tasks(tmp_path: Path) -> None:
    """Under tp 2 x FSDP 2 every rank gathers the full weights onto rank 0, which scores them (tied
    embeddings tied again): the scores of the checkpoint the ranks saved at that step."""
    run_dir = tmp_path / "run"
    cfg = layout_config(run_dir, "model.pattern=MTG*R", "model.tie_embeddings=true", "train.steps=2", "evaluation.interval=0", *EVALUATION,
                        "parallel.tp=2", "parallel.dp_shard=2")
    run_distributed(train_rank, 4, cfg)
    logged = downstream(records(run_dir)[-1])
    assert_same_scores(logged, scores_of_checkpoint(run_dir, 2))
