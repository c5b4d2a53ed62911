"""One entry of `data.sources` opened as tokenized documents, whatever kind of source it is.

How `path` is read (`type: auto`):
- None: the embedded corpus;
- `hf:NAME`: a Hugging Face hub dataset through `datasets` (`subset`, `split`);
- PREFIX with PREFIX.bin / PREFIX.idx beside it, or a path ending in .bin / .idx: a Megatron indexed dataset;
- a directory holding a saved dataset (`save_to_disk`: dataset_info.json or dataset_dict.json): `load_from_disk`;
- anything else: text/jsonl/parquet/arrow files (a file, a directory, a glob or a list).
Indexed data is memory-mapped; text is tokenized once, up front (preprocess large corpora), or
as it is read with `streaming: true` (files and hf sources).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.data.config import DataConfig, SourceConfig
from pretrain.data.corpus import embedded_corpus, load_documents, load_hf_documents, open_files, open_hf
from pretrain.data.documents import Documents, tokenize
from pretrain.data.errors import DataError
from pretrain.data.indexed import IndexedDocuments, check_indexed_vocab, is_indexed_prefix, strip_indexed_suffix
from pretrain.data.streaming import StreamedRows
from pretrain.data.tokenizer import Tokenizer

if TYPE_CHECKING:  # pretrain.config imports this package for DataConfig
    from pretrain.config import TrainConfig

HF_PREFIX = "hf:"
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def source_kind(src: SourceConfig) -> str:
    """`src.type`, or for `auto` the kind its path names (rules in the module docstring)."""
    if src.type != "auto":
        return src.type
    path = src.path
    if path is None:
        return "embedded"
    if isinstance(path, list):
        return "files"
    if path.startswith(HF_PREFIX):
        return "hf"
    if path.endswith((".bin", ".idx")) or is_indexed_prefix(path):
        return "indexed"
    if Path(path).is_dir() and any((Path(path) / m).is_file() for m in SAVED_DATASET_MARKERS):
        return "hf"
    return "files"


def open_source(src: SourceConfig, data: DataConfig, train: TrainConfig, tokenizer: Tokenizer, model_vocab_size: int) -> Documents | StreamedRows:
    """The tokenized documents of `src` (its rows, for a stream); a clear DataError when there are
    none or they cannot feed the model."""
    kind = source_kind(src)
    if src.streaming:
        return open_stream(src, kind, data, train, tokenizer)
    if kind == "indexed":
        docs = IndexedDocuments(strip_indexed_suffix(require_path(src)))
        if not (docs.lengths > 0).any():
            raise DataError(f"data source {docs.name} holds no documents")
        check_indexed_vocab(docs, tokenizer.eos_id, model_vocab_size)
        return docs
    if kind == "embedded":
        texts, name = embedded_corpus(data.embedded_max_bytes), "embedded corpus"
    elif kind == "hf":
        name = require_path(src)
        texts = load_hf_documents(name.removeprefix(HF_PREFIX), src.subset, src.split, src.text_key, data.cache_dir)
    else:
        texts, name = load_documents(require_path(src), src.format, src.text_key, data.cache_dir), str(src.path)
    return tokenize(tokenizer, texts, name)


def open_stream(src: SourceConfig, kind: str, data: DataConfig, train: TrainConfig, tokenizer: Tokenizer) -> StreamedRows:
    if kind not in ("files", "hf"):
        raise DataError(f"data source {src.path}: streaming reads files and hf datasets, not {kind} sources")
    if data.packing == "varlen":
        raise DataError(f"data source {src.path}: varlen packing needs every source tokenized up front (streaming: false)")
    if kind == "hf":
        name = require_path(src)
        stream, key = open_hf(name.removeprefix(HF_PREFIX), src.subset, src.split, src.text_key, data.cache_dir, streaming=True), src.text_key
    else:
        stream, key, name = open_files(require_path(src), src.format, src.text_key, data.cache_dir, streaming=True)
        if stream is None:
            raise DataError(f"data source {name} holds no non-empty documents")
    return StreamedRows(stream, key, tokenizer, train.seq_len, train.seed, data.val_fraction, str(name))


def require_path(src: SourceConfig) -> str:
    if src.path is None:
        raise DataError(f"data source of type {src.type} needs a path")
    return src.path
