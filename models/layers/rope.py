"""Rotary position embedding, rotate-half layout (Llama / GPT-NeoX)."""
from __future__ import annotations

import torch
from torch import Tensor


def apply_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate x [B, T, H, D] by its positions ([T] or [B, T]): channel i pairs with i + D/2."""
    D = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** -(torch.arange(0, D, 2, device=x.device, dtype=dtype) / D)
    angles = positions.to(dtype)[..., None] * inv_freq  # [..., T, D/2]
    angles = torch.cat([angles, angles], dim=-1)[..., None, :]  # broadcast over heads
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(dtype) * angles.cos() + rotated * angles.sin()).to(x.dtype)
