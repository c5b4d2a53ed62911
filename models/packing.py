"""Packed documents: `cu_seqlens` holds the document starts over the flattened B*T tokens, and
the end. Inside the model every row start is included too (`with_row_starts`), so no document,
and no recurrent state, crosses from one row into the next. Decoding from a cache continues one
sequence per row and takes no `cu_seqlens`."""
from __future__ import annotations

import torch
from torch import Tensor


def with_row_starts(cu_seqlens: Tensor, batch: int, length: int) -> Tensor:
    """Document starts over the flattened batch, with every row start added."""
    rows = torch.arange(0, batch * length + 1, length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.unique(torch.cat([cu_seqlens, rows]))


def check_not_decoding(cu_seqlens: Tensor | None, cache: dict | list | None) -> None:
    if cu_seqlens is not None and cache is not None:
        raise ValueError("decoding from a cache does not take packed documents (cu_seqlens)")


def document_ids(cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    """[n_tokens]: the index of the document each token belongs to."""
    tokens = torch.arange(n_tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True)


def positions_in_documents(cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    """[n_tokens]: each token's offset from the start of its document."""
    tokens = torch.arange(n_tokens, device=cu_seqlens.device)
    return tokens - cu_seqlens[document_ids(cu_seqlens, n_tokens)]


def documents_of_tokens(batch: int, length: int, cu_seqlens: Tensor | None, device: torch.device) -> tuple[Tensor, int]:
    """The document index of each of the B*T flat tokens (a batch row is a document unless
    cu_seqlens packs several), and the number of documents."""
    if cu_seqlens is None:
        return torch.arange(batch, device=device).repeat_interleave(length), batch
    return document_ids(cu_seqlens, batch * length), cu_seqlens.numel() - 1


def document_start_mask(cu_seqlens: Tensor, batch: int, length: int) -> Tensor:
    """Bool [batch, length], True where a document starts: `cu_seqlens` in a form that splits
    along the batch like the tokens (pipeline microbatches)."""
    starts = torch.zeros(batch * length, dtype=torch.bool, device=cu_seqlens.device)
    starts[cu_seqlens[:-1].long()] = True
    return starts.view(batch, length)


def cu_seqlens_from_mask(starts: Tensor) -> Tensor:
    """The inverse of `document_start_mask`, every row start included."""
    flat = starts.flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    cu_seqlens = torch.cat([flat.nonzero().flatten(), end]).to(torch.int32)
    return with_row_starts(cu_seqlens, *starts.shape)


def as_one_sequence(x: Tensor, cu_seqlens: Tensor | None, cache: dict | None) -> Tensor:
    """[B, T, ...] -> [1, B*T, ...] for the varlen ops when documents are packed."""
    if cu_seqlens is None:
        return x
    check_not_decoding(cu_seqlens, cache)
    return x.reshape(1, -1, *x.shape[2:])
