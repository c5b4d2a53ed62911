"""Training for the parity tests: each run, the one-process reference and the ranks alike, is
the production step (`pretrain.step.train_step`) on a `Parallel` that the test built, so the
comparisons are of the step that trains, its loss normalisation included.

`packed_batches` are the global batches of the pipeline and FSDP tests; `row_groups` cuts one into
the microbatches a schedule or the one process accumulates, or the rows each dp rank takes.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from models.config import ModelConfig
from models.model import HybridLM
from models.packing import cu_seqlens_from_mask, document_start_mask
from optim.adamw import build_optimizer
from optim.config import OptimConfig
from pretrain.data import Batch
from pretrain.linear_ce import head_loss
from pretrain.parallelize import Parallel
from pretrain.runtime import Runtime
from pretrain.step import StepResult, train_step

CPU = Runtime(torch.device("cpu"), torch.float32)
OPTIM = OptimConfig(lr=3e-3, weight_decay=0.1, fused=False)
GRAD_CLIP = 0.5
STEPS, BATCH, SEQ, VOCAB = 3, 4, 16, 64


def layout(**sizes: int) -> dict[str, int]:
    """A mesh shape (`Parallel.shape`): every dim 1 but `sizes`."""
    return dict(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=1) | sizes


def train_steps(par: Parallel, steps: list[list[Batch]], optimizer: torch.optim.Optimizer | None = None) -> list[StepResult]:
    """One `train_step` per entry of `steps`, accumulating over its batches (a pipeline takes one
    whole batch), with AdamW (`OPTIM`, a new one unless given) and clipping at `GRAD_CLIP`."""
    optimizer = optimizer if optimizer is not None else build_optimizer(par.module, OPTIM)
    return [train_step(par, optimizer, iter(batches), len(batches), GRAD_CLIP, CPU) for batches in steps]


def full(value: Tensor) -> Tensor:
    """A DTensor (sharded or replicated) gathered into a plain tensor; plain tensors unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def total_losses(results: list[StepResult]) -> list[float]:
    """Each step's language-model loss plus its auxiliary loss (a pipeline's loss holds both)."""
    return [(r.loss if r.aux_loss is None else r.loss + r.aux_loss).item() for r in results]


def one_process(cfg: ModelConfig, steps: list[list[Batch]], loss: str = "full") -> tuple[list[float], dict[str, Tensor]]:
    """The reference: `train_steps` of a seed-0 model in one process with `train.loss` `loss` (full
    or chunked); its total losses and final state dict."""
    torch.manual_seed(0)
    model = HybridLM(cfg)
    losses = total_losses(train_steps(Parallel(layout(), module=model, head=head_loss(loss)), steps))
    return losses, {name: value.detach().clone() for name, value in model.state_dict().items()}


def packed_batches() -> list[Batch]:
    """One global batch per step, `BATCH` rows of `SEQ` tokens, with documents of random lengths
    across rows (every label valid)."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        starts = torch.randperm(BATCH * SEQ - 1, generator=gen)[:5] + 1
        cu_seqlens = torch.unique(torch.cat([starts, torch.arange(0, BATCH * SEQ + 1, SEQ)])).to(torch.int32)
        batches.append(Batch(tokens[:, :-1], tokens[:, 1:], cu_seqlens))
    return batches


def row_groups(batch: Batch, groups: int) -> list[Batch]:
    """`batch` cut into `groups` runs of contiguous rows, each with its own document boundaries."""
    starts = document_start_mask(batch.cu_seqlens, *batch.input_ids.shape)
    parts = (t.chunk(groups) for t in (batch.input_ids, batch.labels, starts))
    return [Batch(ids, labels, cu_seqlens_from_mask(st)) for ids, labels, st in zip(*parts)]
