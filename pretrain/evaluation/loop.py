"""Downstream tasks during training (the `evaluation` config section): loaded once at start-up,
run every `evaluation.interval` steps and after the last one on the model as trained.

In one process the tasks run on the training model itself (in eval mode, under the run's
autocast). Under FSDP or TP every rank takes part in gathering the full weights onto rank 0
(`get_model_state_dict`, full and offloaded to its host memory); rank 0 rebuilds a plain
`HybridLM` from them on its device, scores the tasks and frees it, and the metrics reach every
rank, so each step's record is the same everywhere: the other ranks wait for them on a group
of the evaluation's own, bounded by `evaluation.timeout_s` rather than the run's collective timeout
(scoring can take longer than a training collective ever should). Under PP the run refuses the
section at config time (`pretrain.config`).
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from common.errors import first_line
from models.model import HybridLM
from pretrain.config import RunConfig
from pretrain.data import load_tokenizer
from pretrain.errors import RunError
from pretrain.evaluation.tasks import EvaluationError, check_tasks, evaluate_tasks, metric_record, no_progress_bars, task_manager
from pretrain.runtime import Runtime


class DownstreamEvaluation:
    """Rank 0's loaded tasks and tokenizer, and when they are due."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, manager: Any, world_size: int, tokenizer: Any):
        self.cfg, self.section, self.runtime = cfg, cfg.evaluation, runtime
        self.manager, self.world_size, self.tokenizer = manager, world_size, tokenizer
        # made now: a new group needs the launcher's store, which may be gone by the time it is used
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.section.timeout_s)) if world_size > 1 else None

    def due(self, step: int, end: int) -> bool:
        every = self.section.interval
        return step == end or bool(every and step % every == 0)

    def run(self, model: nn.Module, is_main: bool) -> dict[str, float]:
        """The tasks' metrics (on every rank), scored on rank 0; every rank must call it. An
        evaluation that fails is a RunError on every rank (the run then ends as after any error,
        its requested checkpoints committed)."""
        if self.world_size == 1:
            outcome = self._outcome(lambda: self._score(model))
        else:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)  # collective; rank 0 alone receives the tensors
            shared = [self._outcome(lambda: self._score(self._replica(state))) if is_main else None]
            del state
            dist.broadcast_object_list(shared, src=0, group=self.group)
            outcome = shared[0]
        if isinstance(outcome, str):
            raise RunError(outcome)
        return outcome

    @staticmethod
    def _outcome(score: Callable[[], dict[str, float]]) -> dict[str, float] | str:
        """The metrics, or what went wrong as one line."""
        try:
            return score()
        except Exception as exc:  # lm-eval, datasets, the model (out of memory): anything
            return f"downstream evaluation failed: {type(exc).__name__}: {first_line(exc)} (evaluation.tasks; pretrain.evaluate scores checkpoints apart)"

    def _replica(self, state: dict[str, torch.Tensor]) -> HybridLM:
        with torch.device("meta"):
            replica = HybridLM(self.cfg.model)
        replica.load_state_dict(state, assign=True)
        if self.cfg.model.tie_embeddings:
            replica.lm_head.weight = replica.embed.weight
        return replica.to(self.runtime.device)

    def _score(self, model: nn.Module) -> dict[str, float]:
        from pretrain.evaluation.lm import EbbLM

        was_training = model.training
        model.eval()
        try:
            lm = EbbLM(model, self.tokenizer, self.runtime.device, self.section.batch_size, self.section.max_length or self.cfg.train.seq_len,
                       self.runtime.autocast, progress=False)
            with no_progress_bars():
                results = evaluate_tasks(lm, self.section.tasks, self.manager, self.section.limit, self.section.num_fewshot)
        finally:
            model.train(was_training)
        return metric_record(results)


def start_downstream(cfg: RunConfig, runtime: Runtime, is_main: bool, world_size: int, control: dist.ProcessGroup | None) -> DownstreamEvaluation | None:
    """The run's downstream evaluation, its tasks loaded (and their data fetched) on rank 0 before
    anything else is built; None without tasks. A task that does not load is an
    EvaluationError on every rank."""
    if not cfg.evaluation.tasks:
        return None
    manager, failure = None, [None]
    if is_main:
        try:
            manager = task_manager(cfg.evaluation.include_path, cfg.evaluation.tasks)
            check_tasks(cfg.evaluation.tasks, manager)
        except EvaluationError as exc:
            failure[0] = str(exc)
    if world_size > 1:
        dist.broadcast_object_list(failure, src=0, group=control)
    if failure[0] is not None:
        raise EvaluationError(failure[0])
    return DownstreamEvaluation(cfg, runtime, manager, world_size, load_tokenizer(cfg.data.tokenizer) if is_main else None)
