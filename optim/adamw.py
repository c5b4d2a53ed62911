"""AdamW with two parameter groups: decay and no decay."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

# torch >= 2.4 (ebb needs >= 2.6) has fused AdamW kernels for both.
FUSED_DEVICE_TYPES = frozenset({"cpu", "cuda"})


class AdamWSettings(Protocol):
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    fused: bool | None


def wants_weight_decay(param: nn.Parameter) -> bool:
    """Matrices decay; norms, biases (ndim < 2) and parameters marked `_no_weight_decay` do not."""
    return param.ndim >= 2 and not getattr(param, "_no_weight_decay", False)


def fused_available(params: list[nn.Parameter]) -> bool:
    return all(p.device.type in FUSED_DEVICE_TYPES and p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, optim_cfg: AdamWSettings) -> torch.optim.AdamW:
    """Group 0 decays with `weight_decay`, group 1 never decays; `fused: None` = where available."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fused_available(params) if optim_cfg.fused is None else optim_cfg.fused
    groups = [
        {"params": [p for p in params if wants_weight_decay(p)], "weight_decay": optim_cfg.weight_decay},
        {"params": [p for p in params if not wants_weight_decay(p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=fused)
