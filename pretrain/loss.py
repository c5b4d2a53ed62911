"""The training loss, and its normalisation so that every layout trains as one process does.

A step's language-model loss is the mean over every valid label (not `IGNORE_INDEX`) of the global
batch. Each rank sums its tokens' cross-entropy and multiplies the sum by `token_scale`: one over
the global count of valid labels (all-reduced), times what the averaging after it divides by again
(FSDP averages gradients over the dp x cp ranks; a pipeline schedule averages over its
microbatches). Under context parallelism a rank's tokens are its piece of every sequence, so its
summed loss and its gradients are partial sums over the cp group, which that averaging (with the
cp factor in the scale) turns into the one-process sums.

The layout is the mesh shape (`pp`, `dp_replicate`, `dp_shard`, `cp`, `tp` sizes), so this module
needs nothing above torch and the data code can import `IGNORE_INDEX` from it.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

IGNORE_INDEX = -100  # the label after an eos (the next document's first token), counted in no loss

Shape = Mapping[str, int]  # mesh dim -> size, as `parallel.mesh.mesh_shape` gives it


def lm_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy in float32 at least (bf16 logits lose too much in the softmax;
    float64 logits stay float64)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


def add_aux_loss(loss: Tensor, aux_loss: Tensor, aux_scale: float = 1.0) -> Tensor:
    """loss + aux_scale * aux_loss (`aux_scale`: `aux_loss_scale` of the layout), as plain
    tensors. Under loss parallelism `loss` is a replicated DTensor, while the routers' aux loss is
    a plain tensor that is the same on every TP rank (each rank routes identically) and counts
    once on each: adding it to the DTensor would hand the plain graph behind it a DTensor gradient."""
    return local(loss) + aux_loss * aux_scale


def aux_loss_scale(shape: Shape) -> int:
    """What a rank's auxiliary loss is multiplied by: under cp each rank holds its 1/cp share of
    its replica's (the routers' statistics span the whole rows), and FSDP averages gradients over
    the cp ranks as over the dp ranks, so cp."""
    return shape.get("cp", 1)


def local(value: Tensor) -> Tensor:
    """A replicated DTensor (loss, norm) as a plain tensor; plain tensors unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def loss_context(shape: Shape) -> contextlib.AbstractContextManager:
    """Cross-entropy (and its backward) on vocabulary-sharded logits under TP without PP; under PP
    the loss runs inside the schedule, so the head gathers the logits instead."""
    return loss_parallel() if shape["tp"] > 1 and shape["pp"] == 1 else contextlib.nullcontext()


def _sum_over_world(value: Tensor, shape: Shape) -> Tensor:
    if math.prod(shape.values()) > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def global_token_count(labels: Tensor, shape: Shape) -> Tensor:
    """Valid labels in the global batch: every replica's count (its cp ranks' pieces add up to
    it), which its tp x pp ranks share."""
    count = (labels != IGNORE_INDEX).sum().float()
    return _sum_over_world(count, shape) / (shape["pp"] * shape["tp"])


def gradient_averaging(shape: Shape) -> int:
    """The ranks FSDP averages gradients over: dp_replicate x dp_shard x cp."""
    return shape["dp_replicate"] * shape["dp_shard"] * shape.get("cp", 1)


def token_scale(labels: Tensor, shape: Shape, microbatches: int = 1) -> Tensor:
    """What this rank's summed token losses are multiplied by (see the module docstring):
    `labels` are the rank's part of the replica's batch (its cp piece), which a pipeline schedule
    cuts into `microbatches`."""
    return microbatches * gradient_averaging(shape) / global_token_count(labels, shape)


def microbatch_loss(
    logits: Tensor, labels: Tensor, aux_loss: Tensor | None, scale: Tensor | float, with_aux: bool = True, aux_scale: float = 1.0,
) -> Tensor:
    """A pipeline's loss on one microbatch (`parallel.pipeline.build_pipeline_schedule`'s `loss_fn`): the
    summed cross-entropy of its tokens times the step's `scale` (`token_scale` of the replica's
    batch), which the schedule gets from `pipeline_gradients`' `loss_kwargs` since it varies per
    step, plus the auxiliary loss of the last stage times `aux_scale` (`aux_loss_scale`; not in
    evaluation: `with_aux=False`)."""
    return summed_microbatch_loss(lm_loss(logits, labels, reduction="sum"), labels, aux_loss, scale, with_aux, aux_scale)


def summed_microbatch_loss(
    summed: Tensor, labels: Tensor, aux_loss: Tensor | None, scale: Tensor | float, with_aux: bool = True, aux_scale: float = 1.0,
) -> Tensor:
    """`microbatch_loss` when the last stage applied the head's loss itself (the chunked or fused
    linear cross-entropy) and hands over the summed cross-entropy instead of the logits."""
    loss = summed * scale
    return loss if aux_loss is None or not with_aux else add_aux_loss(loss, aux_loss, aux_scale)


def pipeline_loss_fn(head: object | None) -> Callable[..., Tensor]:
    """The schedule's loss function: over the last stage's logits, or, when the last stage applies
    a head loss (`head`, the chunked or fused linear cross-entropy), over the loss it summed."""
    return microbatch_loss if head is None else summed_microbatch_loss


def mean_over_replicas(value: Tensor, shape: Shape) -> Tensor:
    """The mean over dp x cp ranks of a per-rank value that the ranks of the last pipeline stage
    hold (the others pass 0), the same on every rank afterwards. A step's scaled loss is such a
    value under cp too: `token_scale` counts the cp ranks as it counts the dp ranks."""
    return _sum_over_world(local(value).float(), shape) / (math.prod(shape.values()) // shape["pp"])


def sum_over_pieces(value: Tensor, shape: Shape) -> Tensor:
    """A per-replica sum (an evaluation batch's summed loss) that the cp ranks hold in parts, each
    its piece's: the whole sum, averaged over dp ranks, on every rank."""
    return mean_over_replicas(value, shape) * shape.get("cp", 1)
