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

from optim.codecs.base import BlockCodec, Parts, Reduction, Stats, from_blocks, scale_shape, to_blocks

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
    """The 255 midpoints between neighbouring map entries, with -inf and +inf at the ends (257)."""
    qmap = _dynamic_map_on(signed, device)
    inf = torch.tensor([torch.inf], device=device)
    return torch.cat([-inf, (qmap[:-1] + qmap[1:]) / 2, inf])


def _decades(signed: bool) -> list[tuple[float, float, float]]:
    """Per exponent i = 0..6 of the map: (10^(i-7), where its entries begin; a, c such that
    round(|x| a + c) is the index of the positive entry nearest |x| in that decade, to within one)."""
    rows = []
    for i in range(EXPONENT_BITS):
        n = 2**i if signed else 2 ** (i + 1)  # entries of exponent i per sign
        first = 127 + n if signed else n - 1  # index of its smallest positive entry (signed: after 127 negatives and 0)
        # entry j of the decade is 10^(i-6) (0.1 + (j + 0.5) 0.9 / n): j = |x| 10^(6-i) n / 0.9 - (0.1 n / 0.9 + 0.5)
        rows.append((10.0 ** (i - 7), 10.0 ** (6 - i) * n / 0.9, first - (0.1 * n / 0.9 + 0.5)))
    return rows


def _nearest_codes(normed: Tensor, signed: bool, midpoints: Tensor) -> Tensor:
    """The same codes as `torch.bucketize(normed, midpoints[1:-1])` (the count of midpoints
    below each value), as branch-free arithmetic that `torch.compile` fuses: the map's entries
    are evenly spaced within each decade, so the decade (six comparisons) and a multiply-add
    give the index of the nearest entry to within one, and one comparison with the midpoint on
    either side makes it exact (checked against bucketize for every float32 in [2^-30, 1], both
    signs, both maps). Values must lie in [-1, 1] ([0, 1] unsigned)."""
    magnitude = normed.abs()
    (_, a0, c0), *decades = _decades(signed)
    a, c = torch.full_like(magnitude, a0), torch.full_like(magnitude, c0)
    for start, a_i, c_i in decades:
        above = magnitude >= start
        a, c = torch.where(above, a_i, a), torch.where(above, c_i, c)
    index = torch.round(magnitude * a + c)  # 255 for |x| = 1, 127 (signed) / 0 (unsigned) for 0
    if signed:  # the negative entries mirror the positive ones: index k <-> 254 - k (there is no -1)
        index = torch.where(normed < 0, (254.0 - index).clamp(min=0.0), index)
    guess = index.int()
    return guess + (midpoints[guess + 1] < normed).int() - (midpoints[guess] >= normed).int()


def lookup_tables(device: torch.device | str) -> Parts:
    """The maps (decoding) and their padded midpoints (encoding) on `device`."""
    device = torch.device(device)
    return {
        "map_m": _dynamic_map_on(True, device), "map_v": _dynamic_map_on(False, device),
        "mid_m": _midpoints_on(True, device), "mid_v": _midpoints_on(False, device),
    }


def block_codes(blocks: Tensor, absmax: Tensor, signed: bool, tables: Parts | None = None) -> Tensor:
    """uint8 codes of `blocks` `[..., blocks, BLOCK]` whose blocks' absmax is `absmax`: the nearest
    map entry to value / absmax, the lower one on a tie (the count of midpoints below it)."""
    midpoints = (tables or lookup_tables(blocks.device))["mid_m" if signed else "mid_v"]
    normed = blocks / torch.where(absmax > 0, absmax, 1.0).unsqueeze(-1)
    if torch.compiler.is_compiling():
        codes = _nearest_codes(normed, signed, midpoints)
    else:  # eager: one pass of a binary search, the same codes
        codes = torch.bucketize(normed, midpoints[1:-1], out_int32=True)
    return codes.to(torch.uint8)


def quantize(x: Tensor, signed: bool, tables: Parts | None = None) -> tuple[Tensor, Tensor]:
    """(uint8 codes shaped like `x`, fp32 absmax per block along the last dim)."""
    blocks = to_blocks(x, BLOCK)
    absmax = blocks.abs().amax(-1)
    return from_blocks(block_codes(blocks, absmax, signed, tables), x.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool, tables: Parts | None = None) -> Tensor:
    qmap = (tables or lookup_tables(codes.device))["map_m" if signed else "map_v"]
    entries = qmap.index_select(0, codes.flatten().int()).view(codes.shape)
    return from_blocks(to_blocks(entries, BLOCK) * absmax.unsqueeze(-1), codes.shape)


class Int8Codec(BlockCodec):
    name, block, suffixes = "int8", BLOCK, ("_int8", "_int8_absmax")
    statistics: dict[str, Reduction] = {"absmax": "max"}

    def zeros(self, local: Tensor, blocks: torch.Size | None = None) -> Parts:
        codes = torch.zeros(local.shape, dtype=torch.uint8, device=local.device)
        absmax = torch.zeros(blocks or scale_shape(local.shape, BLOCK), dtype=torch.float32, device=local.device)
        return {"_int8": codes, "_int8_absmax": absmax}

    def tables(self, device: torch.device) -> Parts:
        return lookup_tables(device)

    def decode(self, parts: Parts, signed: bool, tables: Parts | None = None) -> Tensor:
        return dequantize(parts["_int8"], parts["_int8_absmax"], signed, tables)

    def block_statistics(self, blocks: Tensor) -> Stats:
        return {"absmax": blocks.abs().amax(-1)}

    def scales(self, stats: Stats) -> Parts:
        return {"_int8_absmax": stats["absmax"]}

    def codes(self, blocks: Tensor, scales: Parts, signed: bool, tables: Parts | None = None) -> Tensor:
        return block_codes(blocks, scales["_int8_absmax"], signed, tables)

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
