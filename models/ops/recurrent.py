"""Step-by-step recurrences: the reference every chunked op is tested against, and the
decoding path (one token at a time from a cached state).

Layouts follow fla: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H] (RWKV-7's per-channel
w, a, b: [B, T, H, K]); states [N, H, K, V]
(the transpose of the papers' S, so o_t = scale * q_t @ S_t). The gated delta rule also takes
grouped value heads as fla does (GVA: v, g, beta and the states with HV heads, a multiple of q's
and k's H; `grouped_value_heads`). With `cu_seqlens` the batch is
[1, total, ...] and the state restarts at every document start; N is then the number of documents.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

StepFn = Callable[..., Tensor]


def grouped_value_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """q and k with v's heads: under grouped value heads each of the H q/k heads serves HV / H
    consecutive value heads."""
    H, HV = q.shape[2], v.shape[2]
    if HV == H:
        return q, k
    if HV % H:
        raise ValueError(f"the value heads ({HV}) must be a multiple of the q/k heads ({H})")
    return q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)


def sequence_spans(batch: int, length: int, cu_seqlens: Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every independent sequence."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1, got {batch}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != length or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the sequence length {length}, got {bounds}")
    return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]


def _recurrent(
    step: StepFn,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    per_step: Sequence[Tensor],
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Runs S = step(S, k_t, v_t, *per_step_t) over every sequence; o_t = scale q_t S_t."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    outputs, finals = [], []
    for n, (b, start, end) in enumerate(sequence_spans(B, T, cu_seqlens)):
        if initial_state is not None:
            S = initial_state[n].to(torch.promote_types(q.dtype, initial_state.dtype))
        else:
            S = q.new_zeros(H, K, V)
        # unbind once per sequence: per-step indexing would make the backward quadratic in T
        steps = zip(*(x[b, start:end].unbind(0) for x in (q, k, v, *per_step)))
        for q_t, k_t, v_t, *inputs_t in steps:
            S = step(S, k_t, v_t, *inputs_t)
            outputs.append(torch.einsum("hk,hkv->hv", q_t * scale, S).to(v.dtype))
        finals.append(S)
    o = torch.stack(outputs).view(B, T, H, V) if outputs else torch.zeros_like(v)
    final = torch.stack(finals) if output_final_state else None
    return o, final


def _gla_step(S: Tensor, k: Tensor, v: Tensor, g: Tensor) -> Tensor:
    return S * g.exp()[:, None, None] + k[:, :, None] * v[:, None, :]


def _delta_step(S: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    u = beta[:, None] * (v - torch.einsum("hk,hkv->hv", k, S))
    return S + k[:, :, None] * u[:, None, :]


def _gated_delta_step(S: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> Tensor:
    return _delta_step(S * g.exp()[:, None, None], k, v, beta)


def _rwkv7_step(S: Tensor, k: Tensor, v: Tensor, w: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """[K, V] layout of S_t = S_{t-1}(diag(exp w_t) + a_t b_t^T) + v_t k_t^T: the rank-1 term
    reads the undecayed previous state through a and writes the result along b."""
    read = torch.einsum("hk,hkv->hv", a, S)
    return S * w.exp()[:, :, None] + b[:, :, None] * read[:, None, :] + k[:, :, None] * v[:, None, :]


def recurrent_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale q_t S_t (per head, scalar gate)."""
    return _recurrent(_gla_step, q, k, v, [g], scale, initial_state, output_final_state, cu_seqlens)


def recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """S_t = S_{t-1} + k_t u_t^T, u_t = beta_t (v_t - S_{t-1}^T k_t);  o_t = scale q_t S_t."""
    return _recurrent(_delta_step, q, k, v, [beta], scale, initial_state, output_final_state, cu_seqlens)


def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The delta rule with a decay first: S <- exp(g_t) S, then the delta update."""
    q, k = grouped_value_heads(q, k, v)
    return _recurrent(_gated_delta_step, q, k, v, [g, beta], scale, initial_state, output_final_state, cu_seqlens)


def recurrent_rwkv7(
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
) -> tuple[Tensor, Tensor | None]:
    """RWKV-7 (DPLR) with per-channel log-decay w and r, w, k, a, b [B, T, H, K]:
    S_t = diag(exp w_t) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T;  o_t = scale r_t S_t."""
    return _recurrent(_rwkv7_step, r, k, v, [w, a, b], scale, initial_state, output_final_state, cu_seqlens)
