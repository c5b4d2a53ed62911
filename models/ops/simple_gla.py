"""Chunkwise-parallel simple GLA (SSD form): S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale q_t S_t.

Per chunk with incoming state S (Gamma = within-chunk cumsum of g):
O = ((Q K^T) o exp(Gamma_i - Gamma_j) o M) V + (exp(Gamma) o Q) S;
S <- exp(Gamma_C) S + (exp(Gamma_C - Gamma) o K)^T V.
Mamba2 maps onto it with q=C, k=B, v=x*dt, g=A*dt, scale=1.
"""
from __future__ import annotations

from torch import Tensor

from models.ops.chunking import autocast_off, chunk_gates, chunked_inputs, final_states, scan_chunks


def _decay_and_add(state: Tensor, total_decay: Tensor, chunk_write: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    return total_decay[..., None, None] * state + chunk_write, ()


@autocast_off
def chunk_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    layout, unit_states, initial_state, Q, K, V, (G,) = chunked_inputs(
        q, k, v, [g], scale, initial_state, cu_seqlens, chunk_size
    )
    gates = chunk_gates(G, layout.resets, like=G)
    chunk_write = (K * gates.to_end[..., None]).transpose(-1, -2) @ V
    entering, _ = scan_chunks(layout, unit_states, [gates.total, chunk_write], _decay_and_add)
    o = gates.decay(Q @ K.transpose(-1, -2)) @ V + (Q * gates.from_start[..., None]) @ entering
    final = final_states(layout, initial_state, entering, gates, K, V) if output_final_state else None
    return layout.from_chunks(o).to(v.dtype), final
