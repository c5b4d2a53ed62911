"""Softmax attention ('*'): q, k, v colwise by head. GQA: the kv heads are sharded too, so rank r
holds query heads and the kv heads they read (heads per kv head is the same on every rank)."""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from models.config import ModelConfig


def plan(mixer: nn.Module) -> dict[str, ParallelStyle]:
    return {name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")}


def divisibility_error(cfg: ModelConfig, tp: int) -> str | None:
    a = cfg.mixers.attention
    for key, heads in (("num_heads", a.num_heads), ("num_kv_heads", a.num_kv_heads or a.num_heads)):
        if heads % tp:
            return f"mixers.attention.{key} ({heads}) must be divisible by parallel.tp ({tp})"
    return None
