"""Pipeline parallelism: cut a HybridLM into stage modules and run them with a schedule from
`torch.distributed.pipelining`.

Stage cuts. With `|` in the pattern, each `|`-separated segment is one stage; otherwise the
blocks are cut into contiguous stages of near-equal forward FLOPs (each block's
`flops_per_token`, the head's on the last stage). There are `pp * pp_virtual_stages` stages;
stage `s` lives on pp rank `s % pp` (looped placement, what the interleaved schedules expect).
The embedding is on the first stage, the final norm and the head on the last.

What crosses a cut: positional tensors `(hidden, *carry)`. `carry` holds the entries of the
model's carry dict that blocks before the cut wrote, in the order blocks first write them
(`carry_layout`; a mixer declares what it writes in `carry_writes`), so each
stage's inputs and outputs have static shapes. The last stage returns `(logits, *carry)` with
only "aux_loss" kept, and the loss function gets both (`LossFn`). With a head loss (the chunked
or fused linear cross-entropy, `build_pipeline_schedule(head=...)`) the last stage applies it
itself, inside its forward as `HybridLM.forward(head=...)` does (so FSDP has gathered the head's
weight), to the microbatch's labels (passed to every stage like `doc_starts`), and returns the
summed loss in place of the logits, which are then never whole.

The loss. A schedule takes its loss function once, at construction, and calls it on every
microbatch, on the thread that runs `schedule.step`. What varies per step (the token normaliser
of the step's global batch) is not stored on it: `pipeline_gradients` takes it as `loss_kwargs`
and binds them to a context variable for the duration of the call, from which every
microbatch's loss call reads them (torch's own `loss_kwargs` argument of `step` exists only from
torch 2.13).

Tied embeddings (as Megatron-LM trains them). The first stage holds the embedding and the last
stage the head, one copy of the tied matrix each, equal at the start (every rank builds the same
model). After each backward the two copies' gradients are summed over a group of just those two
ranks, so both hold the one-process gradient and take the same optimizer step; the gradient norm
counts it once (the first stage's). Each rank holding the head also names its copy
`embed.weight` (`RankStages`), so optimizer state and checkpoints are keyed as in one process.

Packed documents. `cu_seqlens` has a length that varies per batch and cannot be split into
microbatches by the schedule. Every pp rank instead passes `doc_starts`, a bool [B, T] mask of
document starts, as a keyword argument of `schedule.step`: the schedule splits it along the batch
like `input_ids`, and each stage rebuilds its microbatch's `cu_seqlens` from its slice.

Context parallelism. The stages get this cp rank's piece of the tokens and labels, and as
`doc_starts` the document starts of the whole rows [B, cp * T]; each stage makes its microbatch's
`models.context.Piece` from its slice and runs its blocks with it active. A block whose
activations are checkpointed recomputes in the backward with the piece it ran with
(`parallel.data_parallel.apply_activation_checkpointing`).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, _PipelineSchedule
from torch.distributed.tensor import DTensor

from models.config import ModelConfig
from models.context import Piece, context_parallel
from models.model import CarryView, HybridLM
from models.packing import cu_seqlens_from_mask, document_start_mask
from parallel.context_parallel import ContextParallel

PIPELINE_SCHEDULES: dict[str, type[_PipelineSchedule]] = {  # `parallel.pp_schedule` names
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}
LOSS_CARRY = "aux_loss"
HeadLoss = Callable[[Tensor, Tensor, Tensor], Tensor]  # (hidden, head weight, labels) -> summed loss: pretrain.linear_ce's


# ---- where to cut ---------------------------------------------------------------------------

def pattern_stage_sizes(pattern: str) -> list[int] | None:
    """Blocks per stage from the `|` cuts in the pattern; None when it has none."""
    if "|" not in pattern:
        return None
    return [len(ModelConfig.blocks_of(segment)) for segment in pattern.split("|")]


def balanced_stage_sizes(costs: Sequence[float], n_stages: int) -> list[int]:
    """Cut `costs` into `n_stages` non-empty contiguous runs minimising the costliest run
    (exact dynamic programme; ties go to the earliest cut)."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {n_stages} pipeline stages")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[k][i]: the smallest max-stage cost of the first i blocks in k stages; cut[k][i]: where stage k starts
    best = [[math.inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for i in range(k, n - (n_stages - k) + 1):
            for j in range(k - 1, i):
                worst = max(best[k - 1][j], prefix[i] - prefix[j])
                if worst < best[k][i]:
                    best[k][i], cut[k][i] = worst, j
    sizes, i = [], n
    for k in range(n_stages, 0, -1):
        sizes.append(i - cut[k][i])
        i = cut[k][i]
    return sizes[::-1]


def block_costs(model: HybridLM, seq_len: int) -> list[float]:
    """Forward FLOPs per token of each block, with the head's (what the model counts beyond its
    blocks) added to the last block, which always shares the last stage with the head."""
    costs = [block.flops_per_token(seq_len) for block in model.blocks]
    costs[-1] += model.flops_per_token(seq_len) - sum(costs)
    return costs


def stage_block_ranges(model: HybridLM, n_stages: int, seq_len: int) -> list[range]:
    """The blocks of each stage: from the pattern's `|` cuts, else balanced by FLOPs."""
    sizes = pattern_stage_sizes(model.cfg.pattern)
    if sizes is None:
        sizes = balanced_stage_sizes(block_costs(model, seq_len), n_stages)
    elif len(sizes) != n_stages or 0 in sizes:
        raise ValueError(f"pattern {model.cfg.pattern!r} cuts {sizes} blocks per stage; need {n_stages} non-empty stages")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def stages_of_rank(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Looped placement: rank r holds stages r, r + pp, r + 2 pp, ..."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


# ---- what crosses a cut ---------------------------------------------------------------------

def carry_layout(blocks: Sequence[nn.Module]) -> tuple[str, ...]:
    """The carry entries `blocks` write, in first-write order. A mixer that writes into the carry
    dict names those entries in `carry_writes` (models/spec.py)."""
    keys: list[str] = []
    for block in blocks:
        keys += [key for key in block.mixer.carry_writes if key not in keys]
    return tuple(keys)


class StageModule(nn.Module):
    """A contiguous run of a HybridLM's blocks, plus the embedding on the first stage and the norm
    and head on the last. It shares the model's modules under their names in the model
    (`blocks.<i>` keeps the model's index), so stage state dicts are slices of the model's."""

    def __init__(self, model: HybridLM, blocks: range, is_first: bool, is_last: bool):
        super().__init__()
        self.embed = model.embed if is_first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        self.norm = model.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None
        self.tie_embeddings = model.cfg.tie_embeddings
        self.carry_in = carry_layout(model.blocks[: blocks.start])
        written = carry_layout(model.blocks[: blocks.stop])
        self.carry_out = tuple(k for k in written if k == LOSS_CARRY) if is_last else written
        self.head_loss: HeadLoss | None = None  # the last stage's, set by `build_pipeline_schedule`
        self.context: ContextParallel | None = None  # with cp > 1, set by `build_pipeline_schedule`

    def forward(self, x: Tensor, *carry_in: Tensor, doc_starts: Tensor, labels: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
        piece = None if self.context is None else microbatch_piece(self.context, doc_starts)
        cu_seqlens = cu_seqlens_from_mask(doc_starts) if piece is None else piece.local_cu_seqlens
        carry = CarryView(dict(zip(self.carry_in, carry_in)))
        h = x if self.embed is None else self.embed(x)
        with contextlib.nullcontext() if piece is None else context_parallel(piece):
            for block in self.blocks.values():
                h = block(h, cu_seqlens=cu_seqlens, carry=carry)
        if self.lm_head is not None:
            h = self.norm(h)
            h = self.lm_head(h) if self.head_loss is None else self.head_loss(h, self.lm_head.weight, labels)
        # a view leaves as a copy: zero-bubble's input-gradient step detaches stage outputs in place
        outputs = tuple(t.clone() if t._is_view() else t for t in (h, *(carry[key] for key in self.carry_out)))
        return outputs if len(outputs) > 1 else outputs[0]


def microbatch_piece(context: ContextParallel, doc_starts: Tensor) -> Piece:
    """This cp rank's `Piece` of a microbatch whose whole rows' document starts are `doc_starts`."""
    return Piece(context.comm, doc_starts.shape[0], doc_starts.shape[1] // context.comm.size, doc_starts)


LossFn = Callable[..., Tensor]
"""`loss_fn(output, labels, aux_loss, **loss_kwargs)`: one microbatch's loss from the last stage's
output (its logits, or its summed loss with a head loss) and auxiliary loss (None when no block
writes one), with the step's `loss_kwargs`."""


_STEP_LOSS_KWARGS: ContextVar[Mapping[str, Any]] = ContextVar("ebb_step_loss_kwargs", default={})


def last_stage_loss(loss_fn: LossFn) -> Callable[..., Tensor]:
    """The schedule's loss function: the last stage's output, `output` or `(output, aux_loss)`,
    unpacked for `loss_fn`, with the running step's `loss_kwargs`."""

    def loss(output: Tensor | tuple[Tensor, ...], labels: Tensor) -> Tensor:
        output, aux_loss = (output, None) if isinstance(output, Tensor) else output
        return loss_fn(output, labels, aux_loss, **_STEP_LOSS_KWARGS.get())

    return loss


# ---- building and stepping ------------------------------------------------------------------

def build_stage_modules(model: HybridLM, pp_rank: int, pp: int, virtual_stages: int, seq_len: int) -> tuple[list[StageModule], list[int]]:
    """This pp rank's stage modules and their stage indices."""
    n_stages = pp * virtual_stages
    ranges = stage_block_ranges(model, n_stages, seq_len)
    indices = stages_of_rank(pp_rank, pp, virtual_stages)
    modules = [StageModule(model, ranges[s], is_first=s == 0, is_last=s == n_stages - 1) for s in indices]
    return modules, indices


@dataclass
class Pipeline:
    """This pp rank's part of the pipeline: its stage modules (indices `stage_ids` of `n_stages`),
    the schedule that runs them, the pp process group, and with tied embeddings the group of the
    first and last stages' ranks (None on the ranks between, and without tying)."""

    schedule: _PipelineSchedule
    modules: list[StageModule]
    stage_ids: list[int]
    n_stages: int
    group: dist.ProcessGroup
    tied_group: dist.ProcessGroup | None = None

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules for p in module.parameters()]

    def tied_weight(self) -> nn.Parameter | None:
        """This rank's copy of the tied embedding (the embedding on the first stage, the head on
        the last), when there is one."""
        if self.tied_group is None:
            return None
        owner = next(m for m in self.modules if m.embed is not None or m.lm_head is not None)
        return owner.embed.weight if owner.embed is not None else owner.lm_head.weight

    def norm_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients the norm counts: all but the head's tied copy, whose
        gradient (after `sum_tied_gradients`) is the embedding's, counted on the first stage."""
        if self.tied_group is None or self.has_first:
            return self.parameters()
        head = self.tied_weight()
        return [p for p in self.parameters() if p is not head]


def tied_embedding_group(modules: list[StageModule], pp_mesh: DeviceMesh, n_stages: int) -> dist.ProcessGroup | None:
    """With tied embeddings, a group of the two ranks of this pp group that hold the first and the
    last stage, on those two ranks (created by them alone; None elsewhere)."""
    if not modules[0].tie_embeddings:
        return None
    ranks = pp_mesh.mesh.flatten().tolist()  # this pp group's global ranks, by pp rank
    first, last = ranks[0], ranks[(n_stages - 1) % len(ranks)]
    if dist.get_rank() not in (first, last):
        return None
    return dist.new_group([first, last], use_local_synchronization=True)


def sum_tied_gradients(pipeline: Pipeline) -> None:
    """Both copies of the tied embedding get the sum of their gradients (each rank's local shard
    under FSDP/TP: the pair has the same dp and tp coordinates, so the same shard)."""
    weight = pipeline.tied_weight()
    if weight is not None and weight.grad is not None:
        grad = weight.grad
        dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=pipeline.tied_group)


def runs_several_stages(schedule: str) -> bool:
    """Whether the pipeline schedule runs several stages per pp rank (the interleaved ones) or one."""
    return issubclass(PIPELINE_SCHEDULES[schedule], PipelineScheduleMulti)


def build_pipeline_schedule(
    modules: list[StageModule], stage_ids: list[int], pp_mesh: DeviceMesh, schedule: str, microbatches: int,
    loss_fn: LossFn, device: torch.device, head: HeadLoss | None = None, context: ContextParallel | None = None,
) -> Pipeline:
    """Wrap the stage modules (after any FSDP and activation checkpointing) in PipelineStages on the
    mesh's pp group, and a schedule that averages `loss_fn` over `microbatches`; with `head`, the
    last stage applies it and hands `loss_fn` the summed loss instead of the logits; with
    `context`, the stages run their cp pieces (module docstring)."""
    for module in modules:
        module.context = context
        if module.lm_head is not None:
            module.head_loss = head
    n_stages = pp_mesh.size() * len(modules)
    group = pp_mesh.get_group()
    stages = [PipelineStage(module, index, n_stages, device, group=group) for module, index in zip(modules, stage_ids)]
    loss_fn = last_stage_loss(loss_fn)
    schedule_class = PIPELINE_SCHEDULES[schedule]
    if runs_several_stages(schedule):
        runner = schedule_class(stages, n_microbatches=microbatches, loss_fn=loss_fn)
    elif len(stages) == 1:
        runner = schedule_class(stages[0], n_microbatches=microbatches, loss_fn=loss_fn)
    else:
        raise ValueError(f"schedule {schedule} runs one stage per rank, got {len(stages)}")
    return Pipeline(runner, modules, stage_ids, n_stages, group, tied_embedding_group(modules, pp_mesh, n_stages))


def clip_grad_norm_across(
    params: list[nn.Parameter], max_norm: float | None, group: dist.ProcessGroup, counted: list[nn.Parameter] | None = None
) -> Tensor:
    """Clip `params` by the gradient norm over every pp rank's `counted` parameters (default:
    `params`; each rank holds only its stages'; under FSDP the norm of a rank's shards is first
    completed over the dp mesh)."""
    grads = [p.grad for p in (params if counted is None else counted) if p.grad is not None]
    local = torch.nn.utils.get_total_norm(grads)
    if isinstance(local, DTensor):
        local = local.full_tensor()
    squared = local.float().square()
    dist.all_reduce(squared, group=group)
    total = squared.sqrt()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def run_schedule(
    run: Callable[..., Any], pipeline: Pipeline, input_ids: Tensor, labels: Tensor, cu_seqlens: Tensor, loss_kwargs: Mapping[str, Any] | None,
    piece: Piece | None = None,
) -> list[Tensor]:
    """`run` (the schedule's `step`, or `eval`: forward only) on a whole batch, which every pp rank
    passes the same (under cp its `piece`, whose whole rows' document starts the stages get), with
    `loss_kwargs` for the loss of every microbatch; the microbatches' losses on ranks holding the
    last stage, else none."""
    doc_starts = document_start_mask(cu_seqlens, *input_ids.shape) if piece is None else piece.doc_starts
    stage_kwargs = {"doc_starts": doc_starts, "labels": labels}
    args = (input_ids,) if pipeline.has_first else ()
    losses: list[Tensor] = []
    bound = _STEP_LOSS_KWARGS.set(dict(loss_kwargs or {}))
    try:
        if pipeline.has_last:
            run(*args, target=labels, losses=losses, return_outputs=False, **stage_kwargs)
        else:
            run(*args, return_outputs=False, **stage_kwargs)
    finally:
        _STEP_LOSS_KWARGS.reset(bound)
    return losses


def pipeline_loss_sum(
    pipeline: Pipeline, input_ids: Tensor, labels: Tensor, cu_seqlens: Tensor, loss_kwargs: Mapping[str, Any], piece: Piece | None = None,
) -> Tensor | None:
    """The summed loss of a batch (under cp this rank's `piece` of it) through the schedule's
    forward only (evaluation): on ranks holding the last stage, else None."""
    losses = run_schedule(pipeline.schedule.eval, pipeline, input_ids, labels, cu_seqlens, loss_kwargs, piece)
    return torch.stack(losses).sum() if pipeline.has_last else None


def pipeline_gradients(
    pipeline: Pipeline, input_ids: Tensor, labels: Tensor, cu_seqlens: Tensor, grad_clip: float | None,
    loss_kwargs: Mapping[str, Any] | None = None, piece: Piece | None = None,
) -> tuple[Tensor | None, Tensor]:
    """The clipped gradients of a whole batch, which the schedule splits into its microbatches
    (the pipeline's gradient accumulation); the caller steps the optimizer. Every pp rank passes
    the same batch (under cp its `piece` of it); `loss_kwargs` go to the loss function of every microbatch. Returns the mean
    loss (language model plus auxiliary) on ranks holding the last stage, None elsewhere, and the
    gradient norm before clipping."""
    losses = run_schedule(pipeline.schedule.step, pipeline, input_ids, labels, cu_seqlens, loss_kwargs, piece)
    sum_tied_gradients(pipeline)
    grad_norm = clip_grad_norm_across(pipeline.parameters(), grad_clip, pipeline.group, pipeline.norm_parameters())
    loss = torch.stack(losses).mean().detach() if pipeline.has_last else None
    return loss, grad_norm
