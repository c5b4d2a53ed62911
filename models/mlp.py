"""SwiGLU feed-forward, the MLP of every block whose mixer brings none: down(silu(gate(x)) * up(x)),
the product by fla's fused kernel on CUDA in eager mode (models/layers/fla_modules.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.fla_modules import fla_kernel_for
from models.layers.init import residual_scale
from models.spec import TensorParallelPlan

if TYPE_CHECKING:
    from models.config import ModelConfig


class SwiGLU(nn.Module):
    """Built, like every MLP, as `MLP(cfg, layer_idx)` and initialised by the model's
    `reset_parameters` (after the embedding); split by hidden unit under tensor parallelism."""

    tp_plan = TensorParallelPlan(colwise=("gate_proj", "up_proj"), rowwise=("down_proj",))

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d, hidden = cfg.d_model, cfg.mlp_width
        self.std = cfg.init_std
        self.down_std = cfg.init_std * residual_scale(cfg)
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def reset_parameters(self) -> None:
        """N(0, init_std); the down-projection also / sqrt(residual branches) (GPT-2)."""
        nn.init.normal_(self.gate_proj.weight, std=self.std)
        nn.init.normal_(self.up_proj.weight, std=self.std)
        nn.init.normal_(self.down_proj.weight, std=self.down_std)

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if (swiglu := fla_kernel_for(gate, "fla.modules.activations", "swiglu")) is not None:
            return self.down_proj(swiglu(gate, up))  # one fused kernel forward, one backward
        return self.down_proj(F.silu(gate) * up)

    def flops_per_token(self) -> float:
        return 2.0 * 3 * self.gate_proj.in_features * self.gate_proj.out_features
