"""Mamba2 ('M'), sharded by group: rank r holds n_groups/tp groups of B and C and the heads that
read them, so the SSD recurrence, D and the grouped gated norm are all local.

The fused in_proj [z | x | B | C | dt] and the conv over [x | B | C] are reordered rank-major
(`FusedColwiseParallel`, `LocalParameters(segments=...)`): each rank's shard is
[z_r | x_r | B_r | C_r | dt_r], the layout of a Mamba2 with tp times fewer groups. n_groups = 1
cannot be split; replicating B and C instead would need a second, partly replicated in_proj
parameter, so tp must divide n_groups (as in Megatron-LM).

The rank-major row order depends on tp, so these two parameters and their optimizer states are
saved in a tp-specific order (`rank_major_rows` maps it back). A group-major order in the model
itself ([z_g | x_g | B_g | C_g | dt_g] per group, HF order restored on import/export) would make
it the same at every tp, and both plain Colwise/Shard(0)."""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from models.config import ModelConfig
from parallel.tp.styles import FusedColwiseParallel, LocalParameters


def conv_segments(mixer: nn.Module) -> list[int]:
    """The conv channels [x | B | C]."""
    d_bc = mixer.cfg.n_groups * mixer.cfg.d_state
    return [mixer.d_inner, d_bc, d_bc]


def in_proj_segments(mixer: nn.Module) -> list[int]:
    """The in_proj outputs [z | x | B | C | dt]."""
    return [mixer.d_inner, *conv_segments(mixer), mixer.num_heads]


def plan(mixer: nn.Module) -> dict[str, ParallelStyle]:
    return {
        "in_proj": FusedColwiseParallel(in_proj_segments(mixer)),
        "conv1d": LocalParameters(sharded=("weight", "bias"), segments=conv_segments(mixer)),
        "norm": LocalParameters(sharded=("weight",)),
        "": LocalParameters(sharded=("A_log", "dt_bias", "D")),
    }


def divisibility_error(cfg: ModelConfig, tp: int) -> str | None:
    groups = cfg.mixers.mamba2.n_groups
    if groups % tp:
        return f"mixers.mamba2.n_groups ({groups}) must be divisible by parallel.tp ({tp}): Mamba2 shards B/C by group"
    return None
