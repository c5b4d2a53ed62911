"""8-bit block-wise dynamic quantisation (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization"), in bitsandbytes' state format: uint8 codes into a 256-entry dynamic (tree) map,
signed for the first moment and unsigned for the second, and one fp32 absmax per block of 256.

A value is stored as the map entry nearest to value / absmax of its block. When the last dim is
a multiple of 256 the blocks are exactly bitsandbytes' flat blocks, so its CUDA kernel can do the
whole update on these states (`bnb_update_`).
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor

from optim.codecs.base import Parts, StateCodec, from_blocks, scale_shape, to_blocks

BLOCK = 256
EXPONENT_BITS = 7


@functools.cache
def _bnb_functional() -> ModuleType | None:
    """bitsandbytes.functional, imported on first CUDA use only (on CPU its import prints
    warnings about optional kernels); None when it is not installed."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:  # optional: the pure-PyTorch path needs nothing from it
        return None
    return bnb_functional


def _dynamic_map_cpu(signed: bool) -> Tensor:
    """The 256 sorted entries: for exponent i = 0..6, 10^(i-6) times the midpoints of
    linspace(0.1, 1, n + 1) with n = 2^i per sign (signed) or 2^(i+1) (unsigned: the sign bit
    is one more fraction bit), plus 0 and 1. Computed in float32, as bitsandbytes does."""
    entries: list[Tensor] = []
    for i in range(EXPONENT_BITS):
        n = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0 * (10.0 ** (i - EXPONENT_BITS + 1))
        entries += [mids, -mids] if signed else [mids]
    entries.append(torch.tensor([0.0, 1.0]))
    return torch.cat(entries).sort().values


@functools.cache
def _dynamic_map_on(signed: bool, device: torch.device) -> Tensor:
    return _dynamic_map_cpu(signed).to(device)


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The map on `device` (one copy per device, never written to)."""
    return _dynamic_map_on(signed, torch.device(device))


@functools.cache
def _midpoints_on(signed: bool, device: torch.device) -> Tensor:
    qmap = _dynamic_map_on(signed, device)
    return (qmap[:-1] + qmap[1:]) / 2


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(uint8 codes shaped like `x`, fp32 absmax per block along the last dim). The code is the
    nearest map entry, the lower one on a tie: the count of midpoints between entries below x."""
    blocks = to_blocks(x, BLOCK)
    absmax = blocks.abs().amax(-1)
    normed = blocks / torch.where(absmax > 0, absmax, 1.0).unsqueeze(-1)
    codes = torch.bucketize(normed, _midpoints_on(signed, x.device), out_int32=True).to(torch.uint8)
    return from_blocks(codes, x.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    entries = dynamic_map(signed, codes.device).index_select(0, codes.flatten().int()).view(codes.shape)
    return from_blocks(to_blocks(entries, BLOCK) * absmax.unsqueeze(-1), codes.shape)


class Int8Codec(StateCodec):
    name, block, suffixes = "int8", BLOCK, ("_int8", "_int8_absmax")

    def zeros(self, local: Tensor) -> Parts:
        codes = torch.zeros(local.shape, dtype=torch.uint8, device=local.device)
        absmax = torch.zeros(scale_shape(local.shape, BLOCK), dtype=torch.float32, device=local.device)
        return {"_int8": codes, "_int8_absmax": absmax}

    def decode(self, parts: Parts, signed: bool) -> Tensor:
        return dequantize(parts["_int8"], parts["_int8_absmax"], signed)

    def encode_(self, value: Tensor, parts: Parts, signed: bool) -> None:
        codes, absmax = quantize(value, signed)
        parts["_int8"].copy_(codes)
        parts["_int8_absmax"].copy_(absmax)

    def fused_update_(
        self, target: Tensor, grad: Tensor, m: Parts, v: Parts, step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
    ) -> bool:
        if not bnb_can_update(target):
            return False
        bnb_update_(target, grad, m, v, step, lr, betas, eps, weight_decay)
        return True


INT8 = Int8Codec()


def bnb_can_update(param: Tensor) -> bool:
    """bitsandbytes' fused CUDA kernel applies: installed, CUDA, blocks = its flat blocks.
    (On CPU its 8-bit update is unfused, like ours, and its quantiser's bin search is not
    exactly nearest-entry: the pure-PyTorch path is used there.)"""
    return (
        param.is_cuda and param.is_contiguous() and param.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and param.shape[-1] % BLOCK == 0 and _bnb_functional() is not None
    )


def bnb_update_(
    param: Tensor, grad: Tensor, m: Parts, v: Parts, step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    """One AdamW step by bitsandbytes' fused blockwise kernel, on our state tensors in place."""
    _bnb_functional().optimizer_update_8bit_blockwise(
        "adam", grad.contiguous(), param, m["_int8"], v["_int8"], betas[0], betas[1], 0.0, 0.0, eps, step, lr,
        dynamic_map(True, param.device), dynamic_map(False, param.device),
        m["_int8_absmax"].view(-1), v["_int8_absmax"].view(-1), weight_decay=weight_decay,
    )
