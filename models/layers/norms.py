"""RMSNorm and the two gated RMSNorms of docs/layers.md section 0; fla's fused kernels of the same
on CUDA in eager mode (models/layers/fla_modules.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.fla_modules import fla_kernel_for


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """Normalised in float32 at least (float64 inputs stay float64)."""
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def l2_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (fla's q/k normalisation), in float32 at least."""
    if (fused := fla_kernel_for(x, "fla.modules.l2norm", "l2norm")) is not None:
        return fused(x, eps)
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xc * torch.rsqrt(xc.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if (fused := fla_kernel_for(x, "fla.modules.layernorm", "rms_norm")) is not None:
            return fused(x, self.weight, None, eps=self.eps)
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
        if self.gate_first and (fused := fla_kernel_for(x, "fla.modules.layernorm_gated", "rmsnorm_fn")) is not None:
            return fused(x, self.weight, None, z=z, eps=self.eps, group_size=self.group_size, norm_before_gate=False)
        if not self.gate_first and self.group_size == x.shape[-1] and (fused := fla_kernel_for(x, "fla.modules.fused_norm_gate", "rms_norm_gated")) is not None:
            return fused(x, z, self.weight, None, activation="swish", eps=self.eps)
        if self.gate_first:
            x = x * F.silu(z)
        shape = x.shape
        y = rms_norm(x.reshape(*shape[:-1], -1, self.group_size), self.eps).reshape(shape) * self.weight
        return y if self.gate_first else y * F.silu(z)
