"""One training step and one evaluation pass."""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.data import Batch
from pretrain.data.loader import IGNORE_INDEX
from pretrain.runtime import Runtime


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


class StepResult(NamedTuple):
    """Device tensors (reading them would sync every step): the mean LM loss, the gradient norm
    before clipping, and the mean auxiliary loss (None when the model has none)."""

    loss: Tensor
    grad_norm: Tensor
    aux_loss: Tensor | None


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Batch], grad_accum: int, grad_clip: float | None, runtime: Runtime
) -> StepResult:
    """Accumulate gradients over `grad_accum` micro-batches, clip, step. Auxiliary losses are
    added to what is differentiated, not to the returned LM loss."""
    loss_sum, aux_losses = torch.zeros((), device=runtime.device), []
    for _ in range(grad_accum):
        loss, aux_loss = forward_loss(model, next(batches), runtime)
        total = loss if aux_loss is None else loss + aux_loss
        (total / grad_accum).backward()
        loss_sum += loss.detach() / grad_accum
        if aux_loss is not None:
            aux_losses.append(aux_loss.detach().float())
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip is not None else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, grad_norm, torch.stack(aux_losses).mean() if aux_losses else None)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], runtime: Runtime) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over the validation batches."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        loss_sum += forward_loss(model, batch, runtime, reduction="sum")[0].item()
        tokens += int((batch.labels != IGNORE_INDEX).sum())
    model.train()
    loss = loss_sum / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(loss)}
