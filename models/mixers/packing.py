"""Packed documents: `cu_seqlens` holds the document starts over the flattened B*T tokens
(every row start included, so no document crosses a row)."""
from __future__ import annotations

import torch
from torch import Tensor


def document_ids(cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    """[n_tokens]: the index of the document each token belongs to."""
    tokens = torch.arange(n_tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True)


def positions_in_documents(cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    """[n_tokens]: each token's offset from the start of its document."""
    tokens = torch.arange(n_tokens, device=cu_seqlens.device)
    return tokens - cu_seqlens[document_ids(cu_seqlens, n_tokens)]


def as_one_sequence(x: Tensor, cu_seqlens: Tensor | None, cache: dict | None) -> Tensor:
    """[B, T, ...] -> [1, B*T, ...] for the varlen ops when documents are packed."""
    if cu_seqlens is None:
        return x
    if cache is not None:
        raise ValueError("packed documents (cu_seqlens) cannot be decoded from a cache")
    return x.reshape(1, -1, *x.shape[2:])
