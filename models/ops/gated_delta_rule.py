"""Chunkwise-parallel gated delta rule (Gated DeltaNet), in the papers' layout
S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T.
The gated WY form is shared with the delta rule (models/ops/delta_rule.py). q and k may have
fewer heads than v (grouped value heads, as fla's kernel takes them)."""
from __future__ import annotations

from torch import Tensor

from models.ops.chunking import autocast_off
from models.ops.delta_rule import gated_delta_rule_chunks
from models.ops.recurrent import grouped_value_heads


@autocast_off
def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    q, k = grouped_value_heads(q, k, v)
    return gated_delta_rule_chunks(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
