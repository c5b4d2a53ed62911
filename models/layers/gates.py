"""The gates of the delta-rule mixers: the decay log alpha = -exp(A_log) softplus(a + dt_bias)
(docs/layers.md section 3) with its config, and the write strength beta."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from common.config import Strict


class GatedDecayConfig(Strict):
    """What the mixers built on Gated DeltaNet states share: the decay's initialisation (spec
    3d), the op's chunk size and the output norm's eps."""

    A_init_range: tuple[float, float] = Field((0.0, 16.0), description="A ~ U(range), A_log = log A")
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    chunk_size: int = Field(64, gt=0)
    norm_eps: float = Field(1e-6, gt=0)


def log_decay(a: Tensor, A_log: Tensor, dt_bias: Tensor) -> Tensor:
    """log alpha = -exp(A_log) softplus(a + dt_bias) < 0."""
    return -torch.exp(A_log) * F.softplus(a + dt_bias)


def beta_of(b: Tensor) -> Tensor:
    """beta = sigmoid(b) in float32 at least: bf16 would keep 8 bits of a number the state is
    multiplied by at every token (fla's Gated DeltaNet computes it so, inside its kernel)."""
    return torch.sigmoid(b.float() if b.dtype in (torch.float16, torch.bfloat16) else b)


def write_strength(beta: Tensor, allow_neg_eigval: bool) -> Tensor:
    """beta in (0, 1) gives transition eigenvalues 1 - beta in [0, 1]; doubling it to (0, 2)
    extends them to [-1, 1] (Grazzi et al., state tracking)."""
    return 2.0 * beta if allow_neg_eigval else beta
