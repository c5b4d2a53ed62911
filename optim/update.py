"""The AdamW update on codec states, as one function over whole arrays: decode both moments,
step in fp32, encode. `optim/buckets.py` calls it on one parameter or on many laid out together,
eagerly or `torch.compile`d. Where ranks share blocks (`optim/shards.py`), `moment_statistics`
first gives the new moments' per-block statistics (the same arithmetic, nothing written), and
`codec_step` then encodes with the combined ones.

Eager, it is the per-parameter reference: torch's in-place ops in the operation order of
bitsandbytes' 8-bit update (`adamw_update_`), so on CPU its int8 states are bitsandbytes' own.
Compiled, the same ops run on 0-d coefficient tensors (`coefficients`), so that a new learning
rate or step count is a new input rather than a recompile; the backend may round differently
(e.g. eager CPU adds with a fused multiply-add and takes MKL's square root, inductor's CPU code
neither), so a compiled step matches the eager one to float32 rounding, not bit for bit.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from optim.codecs import StateCodec
from optim.codecs.base import BlockCodec, Parts, Stats, to_blocks


def adamw_update_(
    param: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    """One AdamW step in place on fp32 `param`, `m`, `v` (decoupled decay, bias-corrected),
    in the operation order of bitsandbytes' 8-bit update."""
    beta1, beta2 = betas
    moments_update_(m, v, grad, betas)
    denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
    if weight_decay > 0.0:
        param.mul_(1.0 - lr * weight_decay)
    param.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))


def moments_update_(m: Tensor, v: Tensor, grad: Tensor, betas: tuple[float, float]) -> None:
    """The moments' part of `adamw_update_`, in place."""
    beta1, beta2 = betas
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def coefficients(step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, device: torch.device) -> Tensor:
    """The scalars of `adamw_update_`, computed in float64 as Python does there and rounded to
    float32 as torch does when they meet float32 tensors: beta1, 1 - beta1, beta2, 1 - beta2,
    sqrt(1 - beta2^step), eps, 1 - lr weight_decay, -lr / (1 - beta1^step)."""
    beta1, beta2 = betas
    values = [beta1, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2**step), eps, 1.0 - lr * weight_decay, -lr / (1.0 - beta1**step)]
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)


def moments_math(m: Tensor, v: Tensor, grad: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The moments' part of `adamw_math`."""
    return m * c[0] + grad * c[1], v * c[2] + (grad * c[3]) * grad


def adamw_math(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`adamw_update_` out of place on the coefficient tensor `c` (`coefficients`), each op in
    the same order: (param, m, v) after the step."""
    m, v = moments_math(m, v, grad, c)
    denom = v.sqrt() / c[4] + c[5]
    param = param * c[6] + (c[7] * m) / denom  # decay 1 - lr * 0 = 1 is exact: no branch
    return param, m, v


def codec_step(
    codec: StateCodec, target: Tensor, grad: Tensor, param: Tensor | None, m: Parts, v: Parts, hyper: Tensor | dict[str, Any], tables: Parts,
    stats: tuple[Stats, Stats] | None = None,
) -> tuple[Parts, Parts]:
    """One AdamW step of `target` (updated in place: fp32 master copy or the parameter itself)
    from moments stored as `m` and `v` by `codec`; returns the moments' new parts. `param`, when
    given, gets the updated master copy in its own dtype. `hyper`: the `coefficients` tensor
    (compiled) or `adamw_update_`'s keyword arguments (eager). `grad` is rounded to `target`'s
    dtype first, as a gradient of that dtype would be. `stats`: the per-block statistics to
    encode the new moments with (a block codec's, of whole blocks these rows are pieces of);
    None: their own."""
    work = target.float()  # `target` itself when it is fp32
    g = grad.to(target.dtype).float()
    m_value, v_value = codec.decode(m, True, tables), codec.decode(v, False, tables)
    if isinstance(hyper, Tensor):
        work, m_value, v_value = adamw_math(work, g, m_value, v_value, hyper)
        target.copy_(work)
    else:
        adamw_update_(work, g, m_value, v_value, **hyper)
        if work is not target:
            target.copy_(work)
    if param is not None:
        param.copy_(work)
    if stats is not None:
        return codec.encode_with(m_value, stats[0], True, tables), codec.encode_with(v_value, stats[1], False, tables)
    return codec.encode(m_value, True, tables), codec.encode(v_value, False, tables)


def moment_statistics(
    codec: BlockCodec, target: Tensor, grad: Tensor, m: Parts, v: Parts, hyper: Tensor | dict[str, Any], tables: Parts
) -> tuple[Stats, Stats]:
    """The per-block statistics of the moments `codec_step` would encode, by the same arithmetic;
    nothing is written."""
    g = grad.to(target.dtype).float()
    m_value, v_value = codec.decode(m, True, tables), codec.decode(v, False, tables)
    if isinstance(hyper, Tensor):
        m_value, v_value = moments_math(m_value, v_value, g, hyper)
    else:  # a block codec decodes into new tensors
        moments_update_(m_value, v_value, g, hyper["betas"])
    return codec.block_statistics(to_blocks(m_value, codec.block)), codec.block_statistics(to_blocks(v_value, codec.block))
