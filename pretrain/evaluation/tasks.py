"""lm-evaluation-harness tasks: found and loaded by name (lm-eval's registry, plus a folder of
task YAMLs), run on an `LM`, and their metrics as flat records."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import first_line

PREFIX = "downstream/"  # metrics.jsonl, TensorBoard and wandb keys: downstream/<task>/<metric>


class EvaluationError(ValueError):
    """A task that cannot be found or loaded, or lm-eval missing: one `error:` line, exit code 2."""


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvaluationError("downstream evaluation needs lm-evaluation-harness: pip install -e .[eval]") from None


def task_manager(include_path: str | Path | None, names: list[str]) -> Any:
    """lm-eval's task registry, with the YAMLs under `include_path` (a folder) added; only those
    when they hold every task of `names` (indexing lm-eval's own thousands of YAMLs takes seconds)."""
    require_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise EvaluationError(f"evaluation include path {include_path} is not a directory of task YAMLs")
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        if include_path is not None:
            local = TaskManager(include_path=str(include_path), include_defaults=False)
            if set(names) <= set(local.all_tasks) | set(local.all_groups) | set(local.all_tags):
                return local
        return TaskManager(include_path=str(include_path) if include_path is not None else None)


def check_tasks(names: list[str], manager: Any) -> None:
    """Load every task (its dataset included: a hub task downloads it into the datasets cache
    here, once), naming the first that fails."""
    for name in names:
        try:
            with quiet_lm_eval(logging.ERROR):  # its warnings come again when the task runs
                manager.load([name])
        except Exception as exc:  # lm-eval and datasets raise anything from KeyError to ConnectionError
            cause = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else first_line(exc)
            raise EvaluationError(f"evaluation task {name!r} cannot be loaded: {cause}") from None


def evaluate_tasks(lm: Any, names: list[str], manager: Any, limit: float | None, num_fewshot: int | None, bootstrap_iters: int = 0,
                   log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's results of `names` on `lm` (`simple_evaluate`), its seeds fixed as lm-eval's CLI
    fixes them; the caller's random states are left as they were."""
    from lm_eval import simple_evaluate

    with kept_random_state(), quiet_lm_eval():
        return simple_evaluate(
            model=lm, tasks=list(names), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters, log_samples=log_samples,
        )


def metric_record(results: dict[str, Any]) -> dict[str, float]:
    """Every task's and group's metrics as `downstream/<task>/<metric>` (a filter other than
    lm-eval's `none` appended as `_<filter>`), without their standard errors."""
    record = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, comma, filtered = key.partition(",")  # lm-eval's "<metric>,<filter>"; other keys are not metrics
            if not comma or isinstance(value, bool) or not isinstance(value, (int, float)) or name.endswith("_stderr"):
                continue
            suffix = "" if filtered == "none" else f"_{filtered}"
            record[f"{PREFIX}{task}/{name}{suffix}"] = float(value) if math.isfinite(value) else None
    return record


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """lm-eval seeds python, numpy and torch; a training run's streams go on as if it had not."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def quiet_lm_eval(least: int = logging.WARNING) -> Iterator[None]:
    """lm-eval's log records below `least` off (by default its info; its warnings stay)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(level, least))
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Progress bars made meanwhile are not shown (lm-eval draws several per task into
    `sys.stderr`), so that a training run's own bar or lines are the only progress on the console.
    Log records still reach the console: logging's handlers hold the stream they were made with."""
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield
