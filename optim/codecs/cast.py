"""Moments kept as plain floating tensors: fp32 (torch AdamW's own `exp_avg`/`exp_avg_sq`
layout, so the fused kernels apply and older checkpoints load) and bf16 (2 bytes each)."""
from __future__ import annotations

import torch
from torch import Tensor

from optim.codecs.base import Parts, StateCodec


class CastCodec(StateCodec):
    def __init__(self, name: str, dtype: torch.dtype, suffix: str):
        self.name, self.dtype, self.suffix = name, dtype, suffix
        self.suffixes = (suffix,)

    def zeros(self, local: Tensor, blocks: torch.Size | None = None) -> Parts:
        return {self.suffix: torch.zeros(local.shape, dtype=self.dtype, device=local.device)}

    def decode(self, parts: Parts, signed: bool, tables: Parts | None = None) -> Tensor:
        return parts[self.suffix].float()  # no copy for fp32: updated in place, encode_ is then a no-op

    def encode(self, value: Tensor, signed: bool, tables: Parts | None = None) -> Parts:
        return {self.suffix: value if value.dtype == self.dtype else value.to(self.dtype)}


FP32 = CastCodec("fp32", torch.float32, "")
BF16 = CastCodec("bf16", torch.bfloat16, "_bf16")
