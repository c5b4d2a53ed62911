"""Data parallelism with FSDP2, and activation checkpointing.

`apply_fsdp` makes every block its own FSDP unit (its parameters are all-gathered just before it
runs and freed after), then the root module takes what is left (embedding, final norm, head).
Parameters and gradients are sharded, and so is the optimizer state once the optimizer is built on
the sharded parameters. Given a 2-D mesh (dp_replicate, dp_shard), `fully_shard` does HSDP:
shards within dp_shard, replicas across dp_replicate. Works on a HybridLM and on pipeline stage
modules alike (anything with a `blocks` container).

Apply activation checkpointing before FSDP, so each FSDP unit wraps a checkpointed block.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from models.context import active_piece, context_parallel

BlockChoice = Callable[[int, int], bool]  # (block index, train.activation_checkpoint_every) -> recompute it

ACTIVATION_CHECKPOINTING: dict[str, BlockChoice] = {  # `train.activation_checkpoint` names
    "none": lambda index, every: False,
    "full": lambda index, every: True,
    "selective": lambda index, every: (index + 1) % every == 0,
}


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, mixed_precision: bool, reshard_after_forward: bool = True) -> None:
    """Shard `model` in place over `dp_mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP). With
    `mixed_precision`, parameters are gathered in bf16 and gradients reduced in fp32. Forward
    inputs are not cast: casting rebuilds the `carry` dict, so blocks' writes to it would be lost
    (and the embedding already hands the blocks bf16 activations)."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision else None,
        reduce_dtype=torch.float32 if mixed_precision else None,
        cast_forward_inputs=False,
    )
    marks = parameter_marks(model)
    for block in model.blocks.children():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for name, param in model.named_parameters():
        vars(param).update(marks.get(name, {}))


def parameter_marks(model: nn.Module) -> dict[str, dict]:
    """Attributes set on parameters (e.g. `_no_weight_decay`), by name: `fully_shard` replaces
    every parameter with a new DTensor one, which would drop them."""
    return {name: dict(vars(param)) for name, param in model.named_parameters() if vars(param)}


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> None:
    """Recompute in backward, instead of keeping, the activations of the blocks that `mode` picks
    (`ACTIVATION_CHECKPOINTING`): none, every block (`full`) or every `every`-th block
    (`selective`: blocks every-1, 2 every-1, ...). The wrapper keeps state-dict keys unchanged, so
    checkpoints load with or without it."""
    recompute = ACTIVATION_CHECKPOINTING[mode]
    for index, (name, block) in enumerate(list(model.blocks.named_children())):
        if recompute(index, every):
            setattr(model.blocks, name, checkpoint_wrapper(block, context_fn=recompute_in_the_same_piece))


def recompute_in_the_same_piece() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The checkpoint's contexts for the forward and for its recomputation: under context
    parallelism the recomputation runs with the piece that was active in the forward (a pipeline
    runs a microbatch's backward outside the stage forward that made its piece active)."""
    piece = active_piece()
    return contextlib.nullcontext(), contextlib.nullcontext() if piece is None else context_parallel(piece)
