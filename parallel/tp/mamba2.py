"""Mamba2 ('M'), sharded by group: rank r holds n_groups/tp groups of B and C and the heads that
read them, so the SSD recurrence, D and the grouped gated norm are all local.

The model stores the fused in_proj rows group-major ([z_g | x_g | B_g | C_g | dt_g] per group) and
the conv channels as [x_g | B_g | C_g], so plain colwise / Shard(0) sharding gives each rank whole
groups, the layout of a Mamba2 with tp times fewer groups, and the global row order (checkpoints,
optimizer states) is the same at every tp. n_groups = 1 cannot be split; replicating B and C
instead would need a second, partly replicated in_proj parameter, so tp must divide n_groups (as
in Megatron-LM)."""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from models.config import ModelConfig
from parallel.tp.styles import LocalParameters


def plan(mixer: nn.Module) -> dict[str, ParallelStyle]:
    return {
        "in_proj": ColwiseParallel(),
        "conv1d": LocalParameters(sharded=("weight", "bias")),
        "norm": LocalParameters(sharded=("weight",)),
        "": LocalParameters(sharded=("A_log", "dt_bias", "D")),
    }


def divisibility_error(cfg: ModelConfig, tp: int) -> str | None:
    groups = cfg.mixers.mamba2.n_groups
    if groups % tp:
        return f"mixers.mamba2.n_groups ({groups}) must be divisible by parallel.tp ({tp}): Mamba2 shards B/C by group"
    return None
