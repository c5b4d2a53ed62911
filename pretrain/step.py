"""One training step and one evaluation pass, on what `pretrain.parallelize` built for this rank."""
from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from optim.offload import OffloadAdamW
from parallel.pipeline import pipeline_gradients, pipeline_loss_sum
from pretrain.data import Batch
from pretrain.linear_ce import HeadLoss
from pretrain.loss import IGNORE_INDEX, add_aux_loss, aux_loss_scale, lm_loss, local, loss_context, mean_over_replicas, sum_over_pieces, token_scale
from pretrain.parallelize import Parallel, within
from pretrain.runtime import Runtime


def forward_loss(
    model: nn.Module, batch: Batch, runtime: Runtime, head: HeadLoss | None = None, logits_loss: Callable[..., Tensor] = lm_loss
) -> tuple[Tensor, Tensor | None]:
    """The language-model loss summed over the batch's tokens, and the auxiliary loss the blocks
    added up (None when none has one). With `head` (`Parallel.head`: the chunked or fused linear
    cross-entropy) the model hands it its hidden states and head weight and never makes the
    logits; otherwise `logits_loss` (`lm_loss`, or its compiled form) runs on the logits."""
    batch = batch.to(runtime.device)
    carry: dict[str, Tensor] = {}
    with runtime.autocast():
        if head is not None:
            labels = batch.labels
            loss = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, carry=carry, head=lambda h, w: head(h, w, labels))
            return loss, carry.get("aux_loss")
        logits = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, carry=carry)
    return logits_loss(logits, batch.labels, reduction="sum"), carry.get("aux_loss")


class StepResult(NamedTuple):
    """The same on every rank: the mean LM loss over the global batch, the gradient norm of the
    whole model before clipping, and the mean auxiliary loss (None when the model has none, and
    under PP, where it is in `loss`), as device tensors; and whether the optimizer stepped (not
    when the loss or the norm was not finite)."""

    loss: Tensor
    grad_norm: Tensor
    aux_loss: Tensor | None
    stepped: bool = True


def finite(loss: Tensor, grad_norm: Tensor) -> bool:
    """Whether a step's loss and gradient norm are finite: one read of the device per step,
    taken between the backward and the update, so that a diverged step changes nothing."""
    return bool(torch.isfinite(loss) & torch.isfinite(grad_norm))


def step_if_finite(optimizer: torch.optim.Optimizer, loss: Tensor, grad_norm: Tensor) -> bool:
    """The optimizer's step when `finite`; the gradients are dropped either way."""
    ok = finite(loss, grad_norm)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ok


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """The norm of all of `model`'s gradients, which are clipped to `max_norm` (an offloading
    optimizer clips its host copies of gradients too)."""
    if isinstance(optimizer, OffloadAdamW):
        return optimizer.clip_grad_norm_(model.parameters(), max_norm)
    return nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def train_step(
    par: Parallel, optimizer: torch.optim.Optimizer, batches: Iterator[Batch], grad_accum: int, grad_clip: float | None, runtime: Runtime
) -> StepResult:
    """One optimizer step: the pipeline's, or gradients accumulated over `grad_accum`
    micro-batches, clipped, stepped unless the loss or the gradient norm is not finite (see
    `StepResult.stepped`). Auxiliary losses are added to what is differentiated, not to the
    returned LM loss."""
    if par.pipeline is not None:
        return pipeline_step(par, optimizer, next(batches), grad_clip, runtime)
    model = par.module
    loss_sum, aux_losses = torch.zeros((), device=runtime.device), []
    for _ in range(grad_accum):
        batch, piece = par.cut(next(batches).to(runtime.device))
        scale = token_scale(batch.labels, par.shape)
        with loss_context(par.shape), within(piece):
            loss, aux_loss = forward_loss(model, batch, runtime, par.head, par.logits_loss)
            loss = loss * scale
            total = loss if aux_loss is None else add_aux_loss(loss, aux_loss, aux_loss_scale(par.shape))
            (total / grad_accum).backward()
        loss_sum += local(loss.detach()) / grad_accum
        if aux_loss is not None:
            aux_losses.append(aux_loss.detach().float())
    grad_norm = local(clip_gradients(model, optimizer, grad_clip if grad_clip is not None else math.inf))
    loss = mean_over_replicas(loss_sum, par.shape)
    stepped = step_if_finite(optimizer, loss, grad_norm)
    aux_loss = sum_over_pieces(torch.stack(aux_losses).mean(), par.shape) if aux_losses else None
    return StepResult(loss, grad_norm, aux_loss, stepped)


def pipeline_step(par: Parallel, optimizer: torch.optim.Optimizer, batch: Batch, grad_clip: float | None, runtime: Runtime) -> StepResult:
    """`pipeline_gradients` on this replica's batch (this rank's cp piece of it), with the step's
    token normaliser for the loss of each microbatch (`pretrain.loss.microbatch_loss`), then the
    step if finite."""
    batch, piece = par.cut(batch.to(runtime.device))
    scale = token_scale(batch.labels, par.shape, par.microbatches)
    loss_kwargs = {"scale": scale, "aux_scale": aux_loss_scale(par.shape)}
    with runtime.autocast():
        loss, grad_norm = pipeline_gradients(par.pipeline, batch.input_ids, batch.labels, batch.cu_seqlens, grad_clip, loss_kwargs, piece)
    if loss is None:  # not on the last stage
        loss = torch.zeros((), device=runtime.device)
    loss = mean_over_replicas(loss, par.shape)
    return StepResult(loss, grad_norm, None, step_if_finite(optimizer, loss, grad_norm))


def pipeline_eval_loss(par: Parallel, batch: Batch, runtime: Runtime) -> float:
    """The summed language-model loss of one validation batch (this rank's cp piece of it) through
    the pipeline, the whole batch's on every rank."""
    batch, piece = par.cut(batch.to(runtime.device))
    with runtime.autocast():
        loss = pipeline_loss_sum(par.pipeline, batch.input_ids, batch.labels, batch.cu_seqlens, {"scale": 1.0, "with_aux": False}, piece)
    return sum_over_pieces(torch.zeros((), device=runtime.device) if loss is None else loss, par.shape).item()


def eval_loss(par: Parallel, batch: Batch, runtime: Runtime) -> float:
    """The summed language-model loss of one validation batch without a pipeline: under cp each
    rank sums its piece's, and the pieces' sums are added up."""
    batch, piece = par.cut(batch.to(runtime.device))
    with loss_context(par.shape), within(piece):
        loss = local(forward_loss(par.module, batch, runtime, par.head, par.logits_loss)[0])
    return (sum_over_pieces(loss, par.shape) if par.cp > 1 else loss).item()


@torch.no_grad()
def evaluate(par: Parallel, batches: list[Batch], runtime: Runtime) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over the validation batches (every rank runs them
    all, each cp rank its pieces; under PP through the schedule's forward, the loss then shared
    from the last stage)."""
    model = par.module
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        loss_sum += pipeline_eval_loss(par, batch, runtime) if par.pipeline is not None else eval_loss(par, batch, runtime)
        tokens += int((batch.labels != IGNORE_INDEX).sum())
    model.train()
    loss = loss_sum / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(loss)}
