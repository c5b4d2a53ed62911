"""The `evaluation` section: downstream tasks (lm-evaluation-harness) scored during training."""
from __future__ import annotations

from pydantic import Field, field_validator

from common.config import Strict


class EvaluationConfig(Strict):
    tasks: list[str] = Field(default_factory=list, description="lm-eval task, group or tag names (hellaswag, arc_easy, ...); empty: none")
    interval: int = Field(1000, ge=0, description="run the tasks every this many steps and after the last one; 0: only after the last step")
    limit: float | None = Field(None, gt=0, description="examples per task: a count, or a fraction of each task when below 1; None: all")
    include_path: str | None = Field(None, description="a folder of task YAMLs beside lm-eval's own (lm-eval's --include_path)")
    batch_size: int = Field(16, gt=0, description="rows per forward pass; each row packs as many requests as fit")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt; None: each task's own default")
    max_length: int | None = Field(None, gt=0, description="context in tokens; None: train.seq_len")
    timeout_s: float = Field(
        3600.0, gt=0, description="under several ranks: seconds the others wait for rank 0's scores (parallel.collective_timeout_s bounds every other wait)"
    )

    @field_validator("tasks")
    @classmethod
    def _named(cls, tasks: list[str]) -> list[str]:
        if any(not name.strip() for name in tasks):
            raise ValueError("an empty task name")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"a task named twice ({', '.join(sorted({t for t in tasks if tasks.count(t) > 1}))})")
        return tasks
