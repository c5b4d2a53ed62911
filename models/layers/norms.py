"""RMSNorm and the two gated RMSNorms of docs/layers.md section 0; fla's fused kernels of the same
on CUDA in eager mode (models/layers/fla_modules.py)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.fla_modules import fla_function, fla_layers_for


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """Normalised in float32 at least (float64 inputs stay float64)."""
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def l2_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (fla's q/k normalisation), in float32 at least."""
    if fla_layers_for(x) and (fused := fla_function("fla.modules.l2norm", "l2norm")) is not None:
        return fused(x, eps)
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xc * torch.rsqrt(xc.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def fused_norms(x: Tensor) -> SimpleNamespace | None:
    """fla's fused norm functions for `x` (see models/layers/fla_modules.py), or None."""
    if not fla_layers_for(x):
        return None
    found = SimpleNamespace(
        rms_norm=fla_function("fla.modules.layernorm", "rms_norm"),
        rms_norm_gated=fla_function("fla.modules.fused_norm_gate", "rms_norm_gated"),
        group_rms_norm=fla_function("fla.modules.layernorm_gated", "rmsnorm_fn"),
    )
    return found if all(vars(found).values()) else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if (fla := fused_norms(x)) is not None:
            return fla.rms_norm(x, self.weight, None, eps=self.eps)
        return rms_norm(x, self.eps) * self.weight


class GatedRMSNorm(nn.Module):
    """Gated RMSNorm over groups of `group_size` channels.

    gate_first=False (fla `FusedRMSNormGated`, DeltaNet/GDN): y = RMSNorm(x) * w * silu(z), per head.
    gate_first=True (Mamba2 `norm_before_gate=False`): y = RMSNorm_group(x * silu(z)) * w.
    """

    def __init__(self, dim: int, group_size: int | None = None, eps: float = 1e-5, gate_first: bool = False):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.gate_first = gate_first
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        fla = fused_norms(x)
        if fla is not None and self.gate_first:
            return fla.group_rms_norm(x, self.weight, None, z=z, eps=self.eps, group_size=self.group_size, norm_before_gate=False)
        if fla is not None and self.group_size == x.shape[-1]:
            return fla.rms_norm_gated(x, z, self.weight, None, activation="swish", eps=self.eps)
        if self.gate_first:
            x = x * F.silu(z)
        shape = x.shape
        y = rms_norm(x.reshape(*shape[:-1], -1, self.group_size), self.eps).reshape(shape) * self.weight
        return y if self.gate_first else y * F.silu(z)
