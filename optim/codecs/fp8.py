"""FP8 (E4M3) moments in groups of 128 with COAT's dynamic range expansion (Xi et al., ICLR'25).

Per group of 128 along the last dim, with M = max|x|, m = the smallest non-zero |x|, R = M/m
and centre c = sqrt(M m): the exponent k = floor(16 log2(448^2/2) / log2 R) / 16 (a multiple of
1/16 that stretches or squeezes the group's range to about 1e5, what E4M3 covers), then
x' = sign(x) (|x|/c)^k, scale s = (M/c)^k / 448 and the code q = e4m3(x'/s). Decoding inverts
it: x = sign(q) |q s|^(1/k) c. Each group stores three fp32 numbers (s, k, c): 2.19 B/param for
both moments. Codes are kept as the uint8 view of float8_e4m3fn (loaders and casts leave uint8
alone). Branch-free tensor code, so `torch.compile` can fuse it.

The per-element powers are taken as exp2(k log2 y), within a few float32 ulps of pow(y, k) and
a third of its cost (the step's largest); far below E4M3's 3-bit mantissa either way (the codes
of heavy-tailed moments come out the same). The sign is carried by copysign (a zero keeps its
sign bit). A float32 logarithm or power can differ in its last bit between a vector loop and a
scalar remainder: per group they are taken in float64 (`expansion`); per element, eager torch
runs whole vectors as long as each thread's share of a `[groups, 128]` array is whole vectors
(1, 2 or 4 threads), and compiled code always does. Compiled for CPU, each group's float64
numbers are taken by the same scalar code in the loop over its row (`expansion_per_row`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from optim.codecs.base import BlockCodec, Parts, Reduction, Stats, from_blocks, scale_shape, to_blocks

GROUP = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TARGET_LOG2_RANGE = math.log2(E4M3_MAX**2 / 2)
K_STEPS = 16  # k is a multiple of 1/16
K_MAX = 8.0  # a group of (nearly) equal values has R ~ 1: any k fits, keep x' finite
ROW_LANES = 16  # float32 lanes of an AVX-512 register: `expansion_per_row` takes one vector per group


def range_statistics(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(max |x|, smallest non-zero |x|, inf where none) per group of `blocks` [..., groups, GROUP]."""
    mag = blocks.abs()
    return mag.amax(-1), torch.where(mag > 0, mag, torch.inf).amin(-1)


def expansion(big: Tensor, small: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(k, centre, scale) per group from its `range_statistics`; an all-zero group gets
    k = 1, centre = 1, scale = 1 (its codes are 0 whatever they are).

    The logarithm, square root and power of each group are taken in float64 and rounded to
    float32: a float32 power or logarithm differs in its last bit between a vector loop (SLEEF)
    and a scalar one (libm), eager or compiled, so where a group falls in a tensor, or in the
    tensors stepped together, would change its scale. In float64 the two agree to far below a
    float32 rounding step. The products and quotients are float64's too: a group of tiny values
    (a second moment's 1e-10 beside 1e-40) would underflow the centre to 0 in float32, and its
    scale to infinity; the centre is kept at least float32's smallest normal number."""
    empty = big == 0
    big, small = torch.where(empty, 1.0, big).double(), torch.where(empty, 1.0, small).double()
    log2_range = torch.log2(big / small).float()
    k = torch.floor(K_STEPS * TARGET_LOG2_RANGE / log2_range.clamp(min=1e-6)) / K_STEPS
    k = torch.where(empty, 1.0, k.clamp(1.0 / K_STEPS, K_MAX))
    centre = torch.sqrt(big * small).float().clamp(min=torch.finfo(torch.float32).tiny)
    scale = (torch.pow(big / centre.double(), k.double()) / E4M3_MAX).float()
    return k, centre, scale


def expansion_per_row(big: Tensor, small: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`expansion` as the compiled CPU step takes it: each group's numbers as the max of ROW_LANES
    copies of them (the same numbers). Inductor's C++ code then works them out in the loop over the
    groups that reduces and encodes them, rather than in a loop of its own per moment, an OpenMP
    barrier each (costly where threads share cores)."""
    lanes = (t.unsqueeze(-1).expand(*t.shape, ROW_LANES) for t in (big, small))
    k, centre, scale = (t.amax(-1) for t in expansion(*lanes))
    return k, centre, scale


def group_codes(blocks: Tensor, scale: Tensor, k: Tensor, centre: Tensor) -> Tensor:
    """The E4M3 codes of `blocks` [..., groups, GROUP] under their groups' expansion."""
    expanded = torch.copysign(torch.exp2(torch.log2(blocks.abs() / centre.unsqueeze(-1)) * k.unsqueeze(-1)), blocks)
    return (expanded / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(uint8 view of the E4M3 codes shaped like `x`, scale, k, centre per group)."""
    blocks = to_blocks(x, GROUP)
    k, centre, scale = expansion(*range_statistics(blocks))
    return from_blocks(group_codes(blocks, scale, k, centre).view(torch.uint8), x.shape), scale, k, centre


def dequantize(codes: Tensor, scale: Tensor, k: Tensor, centre: Tensor) -> Tensor:
    q = to_blocks(codes.view(E4M3).float(), GROUP)
    magnitude = torch.exp2(torch.log2(q.abs() * scale.unsqueeze(-1)) * (1.0 / k).unsqueeze(-1)) * centre.unsqueeze(-1)
    return from_blocks(torch.copysign(magnitude, q), codes.shape)


def plain_e4m3_roundtrip(x: Tensor) -> Tensor:
    """E4M3 with one absmax/448 scale per group and no expansion: the baseline COAT improves on."""
    blocks = to_blocks(x, GROUP)
    scale = (blocks.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return from_blocks((blocks / scale).to(E4M3).float() * scale, x.shape)


class Fp8Codec(BlockCodec):
    name, block, suffixes = "fp8", GROUP, ("_fp8", "_fp8_scale", "_fp8_k", "_fp8_centre")
    statistics: dict[str, Reduction] = {"max": "max", "min": "min"}

    def zeros(self, local: Tensor, blocks: torch.Size | None = None) -> Parts:
        ones = torch.ones(blocks or scale_shape(local.shape, GROUP), dtype=torch.float32, device=local.device)
        return {
            "_fp8": torch.zeros(local.shape, dtype=torch.uint8, device=local.device),
            "_fp8_scale": ones.clone(), "_fp8_k": ones.clone(), "_fp8_centre": ones,
        }

    def decode(self, parts: Parts, signed: bool, tables: Parts | None = None) -> Tensor:
        return dequantize(parts["_fp8"], parts["_fp8_scale"], parts["_fp8_k"], parts["_fp8_centre"])

    def block_statistics(self, blocks: Tensor) -> Stats:
        big, small = range_statistics(blocks)
        return {"max": big, "min": small}

    def scales(self, stats: Stats) -> Parts:
        big = stats["max"]
        per_row = torch.compiler.is_compiling() and big.device.type == "cpu"
        k, centre, scale = (expansion_per_row if per_row else expansion)(big, stats["min"])
        return {"_fp8_scale": scale, "_fp8_k": k, "_fp8_centre": centre}

    def codes(self, blocks: Tensor, scales: Parts, signed: bool, tables: Parts | None = None) -> Tensor:
        """uint8 codes; compiled, the E4M3 codes themselves, as inductor would reinterpret them in a
        loop of its own (`optim/buckets.py` stores their bits)."""
        codes = group_codes(blocks, scales["_fp8_scale"], scales["_fp8_k"], scales["_fp8_centre"])
        return codes if torch.compiler.is_compiling() else codes.view(torch.uint8)


FP8 = Fp8Codec()
