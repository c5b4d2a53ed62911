"""Token batches for training and evaluation.

Documents are split into train/validation by held-out documents, tokenized once with an eos
after each, and packed: the documents (reshuffled every epoch for training) form one token
stream cut into rows of seq_len+1 tokens that overlap by one, so a batch of B rows is one
contiguous slice of B*seq_len+1 tokens; inputs are its first B*seq_len tokens, labels the last.

Data parallelism: a training batch is global, `dp_size * batch_size` rows, and data-parallel rank
r (the `dp_replicate x dp_shard` coordinate, replica-major) takes rows r*batch_size ..
(r+1)*batch_size - 1 of it. Every rank packs the same stream, so the slices are disjoint and
deterministic, tensor- and pipeline-parallel ranks of one replica read the same rows, and one
process with `batch_size = dp_size * batch_size` sees exactly the union.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pretrain.config import DataConfig, TrainConfig
from pretrain.data.corpus import load_documents
from pretrain.data.errors import DataError
from pretrain.data.tokenizer import Tokenizer, load_tokenizer

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long; IGNORE_INDEX where the input is eos (the label would start the next document)
    cu_seqlens: torch.Tensor  # int32 [n+1]: document starts over the flattened B*T tokens, every row start, then B*T

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.labels.to(device), self.cu_seqlens.to(device))


@dataclass
class TokenizedDocuments:
    tokens: torch.Tensor  # int32 [N]: every document followed by eos
    offsets: list[int]  # document starts in `tokens`, then N

    def __len__(self) -> int:
        return len(self.tokens)

    def in_order(self, order: Sequence[int]) -> torch.Tensor:
        """The token stream with the documents concatenated in `order`."""
        o = self.offsets
        return torch.cat([self.tokens[o[i] : o[i + 1]] for i in order])


def tokenize_documents(tokenizer: Tokenizer, docs: Sequence[str]) -> TokenizedDocuments:
    encoded = tokenizer.encode_batch(docs)
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    pieces = [piece for ids in encoded for piece in (ids.astype(np.int32), eos)]
    tokens = np.concatenate([np.zeros(0, dtype=np.int32), *pieces])
    offsets = np.cumsum([0] + [len(ids) + 1 for ids in encoded])
    return TokenizedDocuments(torch.from_numpy(tokens), offsets.tolist())


def split_documents(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out round(val_fraction * n) random documents (at least one when there are two or more,
    never all of them), each split keeping the original order."""
    n = len(docs)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    held_out = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in held_out]
    val = [d for i, d in enumerate(docs) if i in held_out]
    return train, val


def make_batch(chunk: torch.Tensor, seq_len: int, eos_id: int) -> Batch:
    """A batch from a contiguous slice of B*seq_len+1 stream tokens."""
    input_ids = chunk[:-1].reshape(-1, seq_len).long()
    labels = chunk[1:].reshape(-1, seq_len).long().masked_fill(input_ids == eos_id, IGNORE_INDEX)
    return Batch(input_ids, labels, document_starts(input_ids, eos_id))


def document_starts(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    rows, seq_len = input_ids.shape
    after_eos = (input_ids.flatten() == eos_id).nonzero().flatten() + 1
    row_starts = torch.arange(0, rows * seq_len + 1, seq_len)
    return torch.cat([row_starts, after_eos]).unique().to(torch.int32)


class TokenBatches:
    """Training batches forever: this data-parallel rank's `batch_size` rows of every global batch.
    Each epoch shuffles the documents with seed+epoch and packs them; the rows left over at an
    epoch's end that do not fill a global batch are skipped. `state_dict()` is the exact position
    (in global rows, the same on every rank), so a resumed run sees the batches the uninterrupted
    run would have."""

    def __init__(
        self, docs: TokenizedDocuments, seq_len: int, batch_size: int, seed: int, eos_id: int, dp_rank: int = 0, dp_size: int = 1
    ):
        self.docs, self.seq_len, self.batch_size, self.seed, self.eos_id = docs, seq_len, batch_size, seed, eos_id
        self.dp_rank, self.global_batch_size = dp_rank, dp_size * batch_size
        self.rows_per_epoch = max(len(docs) - 1, 0) // seq_len
        if self.rows_per_epoch < self.global_batch_size:
            each = f" on each of {dp_size} data-parallel ranks" if dp_size > 1 else ""
            raise DataError(
                f"the training split has {len(docs)} tokens, too few for one batch of "
                f"train.batch_size={batch_size} x train.seq_len={seq_len} (+1){each}; use more data or smaller values"
            )
        self.epoch, self.row = 0, 0
        self._stream_epoch, self._stream = -1, docs.tokens

    def __iter__(self) -> "TokenBatches":
        return self

    def __next__(self) -> Batch:
        if self.row + self.global_batch_size > self.rows_per_epoch:
            self.epoch, self.row = self.epoch + 1, 0
        start = (self.row + self.dp_rank * self.batch_size) * self.seq_len
        chunk = self._epoch_stream()[start : start + self.batch_size * self.seq_len + 1]
        self.row += self.global_batch_size
        return make_batch(chunk, self.seq_len, self.eos_id)

    def _epoch_stream(self) -> torch.Tensor:
        if self._stream_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.docs.offsets) - 1, generator=generator).tolist()
            self._stream, self._stream_epoch = self.docs.in_order(order), self.epoch
        return self._stream

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed, "num_tokens": len(self.docs)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, ours in (("seed", self.seed), ("num_tokens", len(self.docs))):
            if state[key] != ours:
                raise DataError(f"data state to resume was saved with {key}={state[key]}, this run has {ours}; the batches would differ")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


def eval_batches(docs: TokenizedDocuments, seq_len: int, batch_size: int, max_batches: int, eos_id: int) -> list[Batch]:
    """Up to `max_batches` batches of the validation documents packed in their held-out order
    (the last batch may have fewer rows); empty when there is not one full row."""
    rows = min(max(len(docs) - 1, 0) // seq_len, max_batches * batch_size)
    return [
        make_batch(docs.tokens[r * seq_len : min(r + batch_size, rows) * seq_len + 1], seq_len, eos_id)
        for r in range(0, rows, batch_size)
    ]


def check_vocab(tokenizer: Tokenizer, spec: str, model_vocab_size: int) -> None:
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"data.tokenizer {spec} has {tokenizer.vocab_size} tokens but model.vocab_size is {model_vocab_size}; "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )


def build_data(
    data_cfg: DataConfig, train_cfg: TrainConfig, model_vocab_size: int, dp_rank: int = 0, dp_size: int = 1
) -> tuple[Tokenizer, TokenBatches, list[Batch]]:
    """The tokenizer, this data-parallel rank's endless training batches, and the fixed validation
    batches of a run (the same on every rank)."""
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    check_vocab(tokenizer, data_cfg.tokenizer, model_vocab_size)
    train_docs, val_docs = split_documents(load_documents(data_cfg), data_cfg.val_fraction, train_cfg.seed)
    t = train_cfg
    train = TokenBatches(tokenize_documents(tokenizer, train_docs), t.seq_len, t.batch_size, t.seed, tokenizer.eos_id, dp_rank, dp_size)
    val = eval_batches(tokenize_documents(tokenizer, val_docs), t.seq_len, t.batch_size, t.eval_batches, tokenizer.eos_id)
    return tokenizer, train, val
