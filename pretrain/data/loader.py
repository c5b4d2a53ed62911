"""Token batches for training and evaluation.

The training data is one global stream of units (rows of seq_len+1 tokens, or varlen packs; see
packing.py) blended from the sources (blend.py). It depends only on the seed, the sources and the
packing, never on the data-parallel size: a global batch is the next `dp_size * per_rank` units,
and data-parallel rank r (the `dp_replicate x dp_shard` coordinate, replica-major) takes units
r*per_rank .. (r+1)*per_rank - 1 of it. Tensor-, pipeline- and context-parallel ranks of one
replica read the same units (a cp rank then takes its piece of every row:
`pretrain.parallelize.Parallel.cut`), and one process with `dp_size` times the batch sees exactly
the union.

The state is the global unit position (and each source's count), the same on every rank. A run
resumed with another DP size continues from that position: no unit is repeated or skipped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from pretrain.data.blend import Blend, realised_proportions
from pretrain.data.config import DataConfig
from pretrain.data.documents import Documents, concatenated, tokenize
from pretrain.data.errors import DataError
from pretrain.data.packing import Batch, PackedRows, VarlenPacks, make_batch
from pretrain.data.prefetch import Prefetcher
from pretrain.data.sources import open_source
from pretrain.data.streaming import StreamedRows
from pretrain.data.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:  # pretrain.config imports this package for DataConfig
    from pretrain.config import TrainConfig

__all__ = ["Batch", "TokenBatches", "build_data", "eval_batches", "split_documents", "tokenize_documents"]


def tokenize_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> Documents:
    return tokenize(tokenizer, texts, "documents")


def split_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Document ids of the training and held-out splits: round(val_fraction * n) random documents
    held out (at least one when there are two or more, never all), each split in id order."""
    n = num_docs
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    held_out = np.zeros(n, dtype=bool)
    held_out[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val].numpy()] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def source_fingerprint(docs: Documents | StreamedRows, ids: np.ndarray | None) -> list:
    """What identifies a source's training data in a saved state: name, documents and tokens (a stream: its name)."""
    if isinstance(docs, StreamedRows):
        return [docs.name, "stream"]
    ids = np.arange(len(docs.lengths)) if ids is None else ids
    return [docs.name, len(ids), int(docs.lengths[ids].sum())]


def realised_mixture(names: Sequence[str], state: dict) -> dict[str, float]:
    """The share of each source in the units a loader state has consumed."""
    return dict(zip(names, realised_proportions(state)))


class TokenBatches:
    """Training batches forever: this data-parallel rank's units of every global batch.
    `state_dict()` is the exact position, so a resumed run sees the batches the uninterrupted run would have."""

    def __init__(
        self,
        docs: Documents | StreamedRows | Sequence[Documents | StreamedRows],
        seq_len: int,
        batch_size: int,
        seed: int,
        eos_id: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        *,
        weights: Sequence[float] | None = None,
        train_ids: Sequence[np.ndarray] | None = None,
        varlen: bool = False,
    ):
        sources = [docs] if not isinstance(docs, Sequence) else list(docs)
        ids = list(train_ids) if train_ids is not None else [None] * len(sources)
        self.seq_len, self.seed, self.eos_id, self.varlen = seq_len, seed, eos_id, varlen
        self.per_rank = 1 if varlen else batch_size
        self.dp_rank, self.global_units = dp_rank, dp_size * self.per_rank
        self.units = [self._units(d, i, batch_size) for d, i in zip(sources, ids)]
        self.names = [d.name for d in sources]
        self.fingerprints = [source_fingerprint(d, i) for d, i in zip(sources, ids)]
        self.blend = Blend(list(weights) if weights is not None else [1.0] * len(sources))

    def _units(self, docs: Documents | StreamedRows, ids: np.ndarray | None, batch_size: int) -> PackedRows | VarlenPacks | StreamedRows:
        if isinstance(docs, StreamedRows):
            return docs
        ids = np.arange(len(docs.lengths)) if ids is None else ids
        if (tokens := int(docs.lengths[ids].sum())) < self.seq_len + 1:
            raise DataError(f"data source {docs.name} has {tokens} training tokens, too few for one row of train.seq_len={self.seq_len} (+1)")
        if self.varlen:
            return VarlenPacks(docs, ids, batch_size * self.seq_len, self.seed)
        return PackedRows(docs, ids, self.seq_len, self.seed)

    @property
    def rows_per_epoch(self) -> int:
        """Rows in one pass over every source (rows packing, random-access sources)."""
        return sum(u.rows_per_epoch for u in self.units)

    def __iter__(self) -> "TokenBatches":
        return self

    def __next__(self) -> Batch:
        units = self.blend.assign(self.global_units)
        mine = units[self.dp_rank * self.per_rank : (self.dp_rank + 1) * self.per_rank]
        return make_batch([self.units[s].unit(j) for s, j in mine], self.eos_id)

    def mixture(self) -> dict[str, float]:
        return realised_mixture(self.names, self.state_dict())

    def state_dict(self) -> dict:
        state = self.blend.state_dict()
        streams = {str(s): u.state_at(state["taken"][s]) for s, u in enumerate(self.units) if isinstance(u, StreamedRows)}
        return state | {
            "seed": self.seed, "seq_len": self.seq_len, "varlen": self.varlen, "sources": [list(f) for f in self.fingerprints], "streams": streams
        }

    def load_state_dict(self, state: dict) -> None:
        ours = self.state_dict()
        for key in ("seed", "seq_len", "varlen", "sources"):
            if state[key] != ours[key]:
                raise DataError(f"data state to resume was saved with {key}={state[key]}, this run has {ours[key]}; the batches would differ")
        self.blend.load_state_dict(state)
        for s, where in state["streams"].items():
            self.units[int(s)].restore(state["taken"][int(s)], where)


class PrefetchedBatches(Prefetcher):
    """`TokenBatches` prepared ahead by a background thread (pinned on CUDA)."""

    batches: TokenBatches

    def mixture(self) -> dict[str, float]:
        return realised_mixture(self.batches.names, self.state_dict())


def mixture_record(batches: TokenBatches | PrefetchedBatches) -> dict[str, float]:
    """Metrics entries `mix/<source>`: the realised blend so far (none for a single source)."""
    mix = batches.mixture()
    return {f"mix/{name}": share for name, share in mix.items()} if len(mix) > 1 else {}


def eval_batches(docs: Sequence[Documents], val_ids: Sequence[np.ndarray], seq_len: int, batch_size: int, max_batches: int, eos_id: int) -> list[Batch]:
    """Up to `max_batches` batches of the held-out documents (every source's, in source then id
    order) packed into rows; the last batch may have fewer rows; empty when there is not one full row."""
    needed = max_batches * batch_size * seq_len + 1
    parts, have = [], 0
    for d, ids in zip(docs, val_ids):
        for i in ids:
            if have >= needed:
                break
            parts.append(concatenated(d, [i]))
            have += len(parts[-1])
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    rows = min(max(len(stream) - 1, 0) // seq_len, max_batches * batch_size)
    row_tokens = [stream[r * seq_len : (r + 1) * seq_len + 1] for r in range(rows)]
    return [make_batch(row_tokens[r : r + batch_size], eos_id) for r in range(0, rows, batch_size)]


def check_vocab(tokenizer: Tokenizer, spec: str, model_vocab_size: int) -> None:
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"data.tokenizer {spec} has {tokenizer.vocab_size} tokens but model.vocab_size is {model_vocab_size}; "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )


def held_out_split(source: Documents | StreamedRows, val_fraction: float, t: TrainConfig) -> tuple[np.ndarray | None, Documents, np.ndarray]:
    """(training document ids, documents holding the held-out ones, their ids); a stream holds its
    training documents itself and gives its first held-out documents, as many as evaluation uses."""
    if isinstance(source, StreamedRows):
        val = source.held_out_documents(t.eval_batches * t.batch_size * t.seq_len + 1)
        return None, val, np.arange(len(val.lengths))
    train_ids, val_ids = split_documents(len(source.lengths), val_fraction, t.seed)
    return train_ids, source, val_ids


def build_data(
    data_cfg: DataConfig, train_cfg: TrainConfig, model_vocab_size: int, dp_rank: int = 0, dp_size: int = 1, device: str = "cpu"
) -> tuple[Tokenizer, PrefetchedBatches | TokenBatches, list[Batch]]:
    """The tokenizer, this data-parallel rank's endless training batches (prefetched unless
    data.prefetch is 0), and the fixed validation batches of a run (the same on every rank)."""
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    check_vocab(tokenizer, data_cfg.tokenizer, model_vocab_size)
    sources = data_cfg.source_list()
    t = train_cfg
    opened = [open_source(s, data_cfg, t, tokenizer, model_vocab_size) for s in sources]
    splits = [held_out_split(d, data_cfg.val_fraction, t) for d in opened]
    train = TokenBatches(
        opened, t.seq_len, t.batch_size, t.seed, tokenizer.eos_id, dp_rank, dp_size,
        weights=[s.weight for s in sources], train_ids=[s[0] for s in splits], varlen=data_cfg.packing == "varlen",
    )
    val = eval_batches([s[1] for s in splits], [s[2] for s in splits], t.seq_len, t.batch_size, t.eval_batches, tokenizer.eos_id)
    if data_cfg.prefetch:
        train = PrefetchedBatches(train, data_cfg.prefetch, pin_memory=device.startswith("cuda") and torch.cuda.is_available())
    return tokenizer, train, val
