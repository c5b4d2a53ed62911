"""Chunkwise-parallel RWKV-7 (diagonal plus low rank, DPLR) with fla's `chunk_rwkv7` signature.

Per head, in ebb's [K, V] state layout (the transpose of the papers' S_t = S_{t-1}(diag(w_t) +
a_t b_t^T) + v_t k_t^T):  S_t = diag(exp w_t) S_{t-1} + b_t u_t^T + k_t v_t^T, u_t = S_{t-1}^T a_t;
o_t = scale S_t^T r_t. w is the log decay; fla's default scale for this op is 1 (RWKV-7 has none).

Inside a chunk with incoming state S (Gamma = within-chunk cumsum of w, per channel), every read
u_i depends on the earlier reads, which gives a unit-lower-triangular system (the WY form):
  u_i = (a_i o exp(Gamma_{i-1}))^T S + sum_{j<i} A_ak[i,j] v_j + A_ab[i,j] u_j,
  A_xy[i,j] = sum_d x_id y_jd exp(Gamma_{i-1,d} - Gamma_{j,d});
so U = (I - A_ab)^-1 (A_ak V + (a o exp(Gamma_{-1})) S), solved once for both right-hand sides.
Then O = (r o exp(Gamma)) S + A_rk V + A_rb U (A_r* with exp(Gamma_i - Gamma_j), j <= i) and
S <- exp(Gamma_C) o S + (k o exp(Gamma_C - Gamma))^T V + (b o exp(Gamma_C - Gamma))^T U.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.ops.chunking import ChannelDecays, autocast_off, channel_decays, channel_final_states, chunked_inputs, scan_chunks


def _reads_without_state(
    A: Tensor, K_out: Tensor, B_out: Tensor, V: Tensor, decays: ChannelDecays
) -> tuple[Tensor, Tensor]:
    """U0 and W with U = U0 + W S for the incoming state S, by one unit-lower-triangular solve
    (the solve reads only the strictly lower triangle of -A_ab; its diagonal counts as 1).
    K_out, B_out are k and b times the decays' writer factor."""
    A_in = A * decays.reader_before
    A_ab = decays.before(A_in @ B_out.transpose(-1, -2))
    A_ak = decays.before(A_in @ K_out.transpose(-1, -2))
    rhs = torch.cat([A_ak @ V, decays.from_start(A_in)], dim=-1)
    UW = torch.linalg.solve_triangular(-A_ab, rhs, upper=False, unitriangular=True)
    return UW.split([V.shape[-1], A.shape[-1]], dim=-1)


def _read_and_write(
    state: Tensor, U0: Tensor, W: Tensor, B_to_end: Tensor, chunk_write: Tensor, total: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    reads = U0 + W @ state
    state = total[..., None] * state + chunk_write + B_to_end.transpose(-1, -2) @ reads
    return state, (reads,)


@autocast_off
def chunk_rwkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    lower_bound: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """r, w, k, a, b [B, T, H, K], v [B, T, H, V] -> (o [B, T, H, V], final state [N, H, K, V]).

    fla's kernel defaults to output_final_state=True, ebb's ops all to False: a call that omits
    the flag gets a final state from fla on CUDA and None here (ebb's mixers always pass it).
    `lower_bound` is the caller's promise that w >= lower_bound, which lets fla's kernel run
    chunks of 64 on tensor cores (without it, chunks of 16); this form needs no such promise.
    The within-chunk decays are factorised (`ChannelDecays`): in float32 the log decay summed
    over half a chunk must stay above -88 (RWKV-7's log w > -0.61 gives at least -20 at chunk 64)."""
    layout, unit_states, initial_state, R, K, V, (W_log, A, B) = chunked_inputs(
        r, k, v, [w, a, b], scale, initial_state, cu_seqlens, chunk_size
    )
    decays = channel_decays(W_log, layout.resets)
    K_out, B_out = K * decays.writer, B * decays.writer
    U0, W = _reads_without_state(A, K_out, B_out, V, decays)
    K_to_end, B_to_end = decays.to_end(K_out), decays.to_end(B_out)
    chunk_write = K_to_end.transpose(-1, -2) @ V
    entering, (reads,) = scan_chunks(
        layout, unit_states, [U0, W, B_to_end, chunk_write, decays.total], _read_and_write
    )
    R_in = R * decays.reader
    o = (
        decays.from_start(R_in) @ entering
        + decays.up_to(R_in @ K_out.transpose(-1, -2)) @ V
        + decays.up_to(R_in @ B_out.transpose(-1, -2)) @ reads
    )
    final = None
    if output_final_state:
        final = channel_final_states(layout, initial_state, entering, decays, [(K, V), (B, reads)])
    return layout.from_chunks(o).to(v.dtype), final
