"""One training step and one evaluation pass."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from parallel.pipeline import pipeline_train_step
from parallel.tp import add_aux_loss
from pretrain.data import Batch
from pretrain.data.loader import IGNORE_INDEX
from pretrain.runtime import Runtime

if TYPE_CHECKING:
    from pretrain.parallelize import Parallel


def lm_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy in float32 (bf16 logits lose too much in the softmax)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


def forward_loss(model: nn.Module, batch: Batch, runtime: Runtime, reduction: str = "mean") -> tuple[Tensor, Tensor | None]:
    """The language-model loss, and the auxiliary loss the blocks added up (None when none has one)."""
    batch = batch.to(runtime.device)
    carry: dict[str, Tensor] = {}
    with runtime.autocast():
        logits = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, carry=carry)
    return lm_loss(logits, batch.labels, reduction), carry.get("aux_loss")


def local(value: Tensor) -> Tensor:
    """A replicated DTensor (loss, norm) as a plain tensor; plain tensors unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


class StepResult(NamedTuple):
    """Device tensors (reading them would sync every step), the same on every rank: the mean LM
    loss over the global batch, the gradient norm of the whole model before clipping, and the
    mean auxiliary loss (None when the model has none, and under PP, where it is in `loss`)."""

    loss: Tensor
    grad_norm: Tensor
    aux_loss: Tensor | None


def train_step(
    par: Parallel, optimizer: torch.optim.Optimizer, batches: Iterator[Batch], grad_accum: int, grad_clip: float | None, runtime: Runtime
) -> StepResult:
    """One optimizer step: the pipeline's, or gradients accumulated over `grad_accum`
    micro-batches, clipped, stepped. Auxiliary losses are added to what is differentiated, not to
    the returned LM loss."""
    if par.pipeline is not None:
        return pipeline_step(par, optimizer, next(batches), grad_clip, runtime)
    model = par.module
    loss_sum, aux_losses = torch.zeros((), device=runtime.device), []
    for _ in range(grad_accum):
        batch = next(batches).to(runtime.device)
        scale = par.dp_size / par.global_token_count(batch.labels)  # FSDP divides by dp_size again
        with par.loss_context():
            loss, aux_loss = forward_loss(model, batch, runtime, reduction="sum")
            loss = loss * scale
            total = loss if aux_loss is None else add_aux_loss(loss, aux_loss)
            (total / grad_accum).backward()
        loss_sum += local(loss.detach()) / grad_accum
        if aux_loss is not None:
            aux_losses.append(aux_loss.detach().float())
    grad_norm = local(nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip is not None else math.inf))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    aux_loss = par.mean_over_replicas(torch.stack(aux_losses).mean()) if aux_losses else None
    return StepResult(par.mean_over_replicas(loss_sum), grad_norm, aux_loss)


def pipeline_step(par: Parallel, optimizer: torch.optim.Optimizer, batch: Batch, grad_clip: float | None, runtime: Runtime) -> StepResult:
    """`pipeline_train_step` on this replica's batch; the schedule averages over its microbatches
    and FSDP over the dp ranks, so each microbatch's token sum is scaled by both."""
    batch = batch.to(runtime.device)
    par.loss.scale = par.microbatches * par.dp_size / par.global_token_count(batch.labels)
    with runtime.autocast():
        loss, grad_norm = pipeline_train_step(par.pipeline, optimizer, batch.input_ids, batch.labels, batch.cu_seqlens, grad_clip)
    if loss is None:  # not on the last stage
        loss = torch.zeros((), device=runtime.device)
    return StepResult(par.mean_over_replicas(loss), grad_norm, None)


@torch.no_grad()
def evaluate(par: Parallel, batches: list[Batch], runtime: Runtime) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over the validation batches (every rank runs them all)."""
    model = par.module
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        with par.loss_context():
            loss_sum += local(forward_loss(model, batch, runtime, reduction="sum")[0]).item()
        tokens += int((batch.labels != IGNORE_INDEX).sum())
    model.train()
    loss = loss_sum / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(loss)}
