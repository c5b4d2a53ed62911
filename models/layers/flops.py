"""Forward FLOPs per token, counted from each mixer's own algorithm (a matmul m x k x n is 2mkn)."""
from __future__ import annotations

from torch import nn

from models.layers.conv import ShortConv


def projection_flops(mixer: nn.Module) -> float:
    """Every Linear (2 * in * out) and every short convolution (2 * W * channels) of a mixer."""
    flops = 0.0
    for m in mixer.modules():
        if isinstance(m, nn.Linear):
            flops += 2.0 * m.in_features * m.out_features
        elif isinstance(m, ShortConv):
            flops += 2.0 * m.kernel_size[0] * m.out_channels
    return flops


def chunked_recurrence_flops(chunk: int, d_k: int, d_v: int, delta_rule: bool) -> float:
    """Forward matmul FLOPs per token and head of a chunkwise op with chunk length `chunk`.

    Every op: the intra-chunk scores Q K^T and their product with V (2C(d_k + d_v)), the read
    of the incoming state Q S and the write K^T V (4 d_k d_v). The delta rule adds the WY form:
    K K^T (2C d_k), the triangular solve (C^3/3 multiply-adds per chunk), W = T K, U = T V
    (2C(d_k + d_v)) and U - W S (2 d_k d_v). Gates and norms are elementwise and not counted.
    """
    flops = 2.0 * chunk * (d_k + d_v) + 4.0 * d_k * d_v
    if delta_rule:
        flops += 2.0 * chunk * d_k + 2.0 * chunk * chunk / 3 + 2.0 * chunk * (d_k + d_v) + 2.0 * d_k * d_v
    return flops


def dplr_recurrence_flops(chunk: int, d_k: int, d_v: int) -> float:
    """Forward matmul FLOPs per token and head of `chunk_rwkv7` (models/ops/rwkv7.py).

    Four decayed score matrices (a.b, a.k, r.k, r.b: 8C d_k), A_ak V (2C d_v), the triangular
    solve with d_v + d_k right-hand sides (C(d_k + d_v)), A_rk V and A_rb U (4C d_v), and four
    state products: W S, b^T U, k^T V and r S (8 d_k d_v). Decays, norms and gates are elementwise.
    """
    return 9.0 * chunk * d_k + 7.0 * chunk * d_v + 8.0 * d_k * d_v
