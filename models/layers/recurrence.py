"""The call through which every linear mixer runs its chunked op, continuing from and updating
its decode cache."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from models.context import Transition, active_piece, no_cache, state_passing

ChunkOp = Callable[..., tuple[Tensor, Tensor | None]]


def cached_recurrence(
    op: ChunkOp,
    *inputs: Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Tensor | None,
    cache: dict | None,
    transition: Transition | None = None,
    **options: Any,
) -> Tensor:
    """Run a chunked op (fla signature; `options` are the op's own further keywords) from the
    state in `cache` (zero when absent) and store the final state back: a prefill or a decode
    step of any length. Under context parallelism the state entering this rank's piece comes
    from the earlier pieces instead, summarised as `transition` says (the mixer's cp_plan)."""
    piece = active_piece()
    no_cache(piece, cache)
    if piece is not None:
        if transition is None:
            raise ValueError(f"{getattr(op, '__name__', op)} runs under context parallelism, but its mixer declares no cp_plan transition")
        return state_passing(piece, op, inputs, transition, scale, chunk_size, cu_seqlens, options)
    o, state = op(
        *inputs,
        scale=scale,
        initial_state=None if cache is None else cache.get("state"),
        output_final_state=cache is not None,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        **options,
    )
    if cache is not None:
        cache["state"] = state
    return o

