"""Chunkwise-parallel delta rule in the WY/UT form, with an optional per-head log-gate g
(the gated delta rule is this with g; without g, and without document resets, every decay is 1).

Per chunk (Gamma = within-chunk cumsum of g, D_ij = exp(Gamma_i - Gamma_j) for j <= i):
T = (I + tril_-1(diag(beta) (K K^T o D)))^-1;  U = T diag(beta) V;  W = T diag(beta) (exp(Gamma) o K).
With incoming state S:  U' = U - W S;  O = (exp(Gamma) o Q) S + ((Q K^T) o D) U';
S <- exp(Gamma_C) S + (exp(Gamma_C - Gamma) o K)^T U'.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.ops.chunking import ChunkGates, autocast_off, chunk_gates, chunked_inputs, final_states, scan_chunks


def _wy_representation(K: Tensor, V: Tensor, beta: Tensor, gates: ChunkGates) -> tuple[Tensor, Tensor]:
    """U and W of every chunk at once, by one unit-lower-triangular solve with both right-hand
    sides (T is never formed). The solve reads only the strictly lower triangle of the system;
    its diagonal counts as 1."""
    system = gates.decay(beta[..., None] * (K @ K.transpose(-1, -2)))
    rhs = torch.cat([beta[..., None] * V, (beta * gates.from_start)[..., None] * K], dim=-1)
    UW = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    return UW.split([V.shape[-1], K.shape[-1]], dim=-1)


def _correct_and_write(
    state: Tensor, U: Tensor, W: Tensor, K_to_end: Tensor, total_decay: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    corrected = U - W @ state
    state = total_decay[..., None, None] * state + K_to_end.transpose(-1, -2) @ corrected
    return state, (corrected,)


def gated_delta_rule_chunks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    per_head = [beta] if g is None else [beta, g]
    layout, unit_states, initial_state, Q, K, V, (B, *G) = chunked_inputs(
        q, k, v, per_head, scale, initial_state, cu_seqlens, chunk_size
    )
    gates = chunk_gates(G[0] if G else None, layout.resets, like=B)
    U, W = _wy_representation(K, V, B, gates)
    K_to_end = K * gates.to_end[..., None]
    entering, (corrected,) = scan_chunks(layout, unit_states, [U, W, K_to_end, gates.total], _correct_and_write)
    o = (Q * gates.from_start[..., None]) @ entering + gates.decay(Q @ K.transpose(-1, -2)) @ corrected
    final = final_states(layout, initial_state, entering, gates, K, corrected) if output_final_state else None
    return layout.from_chunks(o).to(v.dtype), final


@autocast_off
def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    return gated_delta_rule_chunks(
        q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size
    )
