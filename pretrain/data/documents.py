"""Tokenized documents with random access: in memory (tokenized text) or a Megatron indexed dataset.

Every document ends with the tokenizer's end-of-document token; packing finds document
boundaries by it.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from pretrain.data.tokenizer import Tokenizer


class Documents(Protocol):
    """A source's documents after tokenization: lengths up front, tokens on demand."""

    name: str
    lengths: np.ndarray  # int64 [n]: tokens of each document, its eos included

    def read(self, doc: int, offset: int, count: int) -> np.ndarray:
        """`count` tokens of document `doc` from `offset`."""
        ...


class InMemoryDocuments:
    """Documents as one token array (each followed by eos) and their start offsets."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, name: str):
        self.tokens, self.lengths, self.name = tokens, lengths.astype(np.int64), name
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def read(self, doc: int, offset: int, count: int) -> np.ndarray:
        start = self.starts[doc] + offset
        return self.tokens[start : start + count]


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], name: str) -> InMemoryDocuments:
    """`texts` tokenized, an eos after each."""
    encoded = tokenizer.encode_batch(texts)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    pieces = [piece for ids in encoded for piece in (ids.astype(dtype), eos)]
    tokens = np.concatenate([np.zeros(0, dtype=dtype), *pieces])
    return InMemoryDocuments(tokens, np.array([len(ids) + 1 for ids in encoded], dtype=np.int64), name)


def concatenated(docs: Documents, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The tokens of documents `ids`, in that order, as one array."""
    parts = [docs.read(int(i), 0, int(docs.lengths[i])) for i in ids]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
