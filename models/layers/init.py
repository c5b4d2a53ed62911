"""Initialisers shared by the mixers (docs/layers.md, "Init" of each section)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from models.config import ModelConfig


def no_weight_decay(*params: nn.Parameter) -> None:
    for p in params:
        p._no_weight_decay = True


def residual_scale(cfg: ModelConfig) -> float:
    """GPT-2's 1/sqrt(residual branches) for the projections that write into the residual."""
    return 1.0 / math.sqrt(cfg.residuals_per_block * cfg.n_layers) if cfg.rescale_residual else 1.0


@torch.no_grad()
def init_normal_(module: nn.Module, std: float) -> None:
    """Every Linear and Conv1d weight inside `module` ~ N(0, std), every bias 0 (fla)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def init_decay_(
    A_log: nn.Parameter,
    dt_bias: nn.Parameter,
    A_range: tuple[float, float],
    dt_min: float,
    dt_max: float,
    dt_floor: float,
) -> None:
    """Mamba2's decay parameters: A ~ U(A_range), A_log = log A; dt = exp(U[log dt_min,
    log dt_max]) clamped >= dt_floor, dt_bias = softplus^-1(dt). Both skip weight decay."""
    A = torch.empty(A_log.shape, dtype=torch.float64).uniform_(*A_range)
    A_log.copy_(A.log())
    log_dt = torch.empty(dt_bias.shape, dtype=torch.float64).uniform_(math.log(dt_min), math.log(dt_max))
    dt = log_dt.exp().clamp(min=dt_floor)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    no_weight_decay(A_log, dt_bias)
