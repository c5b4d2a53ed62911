"""Tokenize a corpus into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx), in parallel.

    python -m pretrain.data.preprocess --input corpus/*.jsonl --output data/corpus [--tokenizer byte] [--workers 8]

Every non-empty document is tokenized (without special tokens) and followed by the tokenizer's
end-of-document token, one sequence per document, in input order. Tokens are uint16 when the
vocabulary fits, int32 otherwise. The files are written with megatron-core's
`IndexedDatasetBuilder`, so megatron-core (and Megatron-LM) read them; PREFIX.ebb.json records
the tokenizer so a training run can check it against `model.vocab_size` before it starts.

The files are written under temporary names and renamed into place once complete, so a failure
or an interruption (Ctrl-C, SIGTERM) leaves no partial dataset and replaces no earlier one.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from pretrain.data.corpus import open_files, open_hf
from pretrain.data.errors import DataError
from pretrain.data.indexed import megatron_indexed, sidecar_path, write_sidecar
from pretrain.data.sources import HF_PREFIX
from pretrain.data.tokenizer import Tokenizer, load_tokenizer

_worker_tokenizer: Tokenizer | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="text/jsonl/parquet/arrow files, directories or globs; or hf:NAME / a saved dataset")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.ebb.json")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer (default: byte)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--format", default="auto", choices=["auto", "text", "json", "parquet", "arrow"])
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--split", default="train", help="hf:NAME or saved dataset: the split")
    parser.add_argument("--batch-size", type=int, default=1000, help="documents per task handed to a worker")
    parser.add_argument("--cache-dir", default=None, help="datasets cache")
    return parser.parse_args(argv)


def token_dtype(vocab_size: int) -> type[np.number]:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def text_batches(args: argparse.Namespace) -> tuple[Iterator[list[str]], int]:
    """Batches of documents of the input and how many documents there are."""
    if len(args.input) == 1 and (args.input[0].startswith(HF_PREFIX) or Path(args.input[0], "dataset_info.json").is_file()):
        name = args.input[0].removeprefix(HF_PREFIX)
        ds, key = open_hf(name, None, args.split, args.text_key, args.cache_dir), args.text_key
    else:
        ds, key, name = open_files(args.input, args.format, args.text_key, args.cache_dir)
    if ds is None or len(ds) == 0:
        raise DataError(f"--input {name} holds no documents")
    return (batch[key] for batch in ds.iter(batch_size=args.batch_size)), len(ds)


def _init_worker(spec: str) -> None:
    """A worker tokenizes; Ctrl-C reaches the whole process group, and the parent alone handles it."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    _worker_tokenizer = load_tokenizer(spec)


def _encode(texts: list[str]) -> tuple[int, list[np.ndarray]]:
    """A worker's batch: its size, and each non-empty document's ids followed by eos."""
    tok = _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    size, texts = len(texts), [t for t in texts if t]
    return size, [np.append(ids.astype(dtype), dtype(tok.eos_id)) for ids in tok.encode_batch(texts)]


def check_args(args: argparse.Namespace) -> None:
    """The numbers are usable and `--output` can be written, before any work."""
    for flag, value in (("--workers", args.workers), ("--batch-size", args.batch_size)):
        if value < 1:
            raise DataError(f"{flag} must be at least 1 (got {value})")
    directory = Path(args.output).parent
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"--output {args.output}: {existing} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise DataError(f"--output {args.output}: cannot write into {directory}: {exc.strerror or exc}") from None
    for suffix in (".bin", ".idx"):
        if Path(f"{args.output}{suffix}").is_dir():
            raise DataError(f"--output {args.output}: {args.output}{suffix} is a directory")


def output_files(prefix: str) -> list[Path]:
    """What a dataset is: the token file, its index and the sidecar, in the order of their renames."""
    return [Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), sidecar_path(prefix)]


def partial_prefix(prefix: str) -> str:
    """Where the files are written before their renames: hidden beside the final ones."""
    path = Path(prefix)
    return str(path.with_name(f".{path.name}.partial-{os.getpid()}"))


def preprocess(args: argparse.Namespace) -> tuple[int, int]:
    """Write the indexed dataset; returns (documents, tokens)."""
    check_args(args)
    tokenizer = load_tokenizer(args.tokenizer)
    batches, num_docs = text_batches(args)
    temporary_prefix = partial_prefix(args.output)
    temporary = output_files(temporary_prefix)
    try:
        documents, tokens = write_dataset(args, tokenizer, batches, num_docs, temporary_prefix)
        for path, final in zip(temporary, output_files(args.output)):
            os.replace(path, final)
    finally:
        for path in temporary:
            path.unlink(missing_ok=True)
    return documents, tokens


def write_dataset(args: argparse.Namespace, tokenizer: Tokenizer, batches: Iterator[list[str]], num_docs: int, prefix: str) -> tuple[int, int]:
    """Tokenize `batches` in the worker pool into the dataset files of `prefix`."""
    bin_path, idx_path, _ = output_files(prefix)
    builder = megatron_indexed().IndexedDatasetBuilder(str(bin_path), dtype=token_dtype(tokenizer.vocab_size))
    documents = tokens = 0
    with multiprocessing.get_context("spawn").Pool(args.workers, _init_worker, (args.tokenizer,)) as pool, tqdm(
        total=num_docs, unit="doc", desc="tokenizing", file=sys.stderr, disable=None  # None: off unless a terminal
    ) as progress:
        for size, encoded in pool.imap(_encode, batches):
            for ids in encoded:
                builder.add_document(torch.from_numpy(ids), [len(ids)])
            documents, tokens = documents + len(encoded), tokens + sum(len(ids) for ids in encoded)
            progress.update(size)
    if documents == 0:
        raise DataError(f"--input {' '.join(args.input)} holds no non-empty documents")
    builder.finalize(str(idx_path))
    write_sidecar(prefix, args.tokenizer, tokenizer.vocab_size, tokenizer.eos_id, documents, tokens)
    return documents, tokens


class Stopped(Exception):
    """SIGINT or SIGTERM: stop where we are (the temporaries are removed on the way out)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        documents, tokens = preprocess(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(f"ebb: {exc}: stopped; nothing written to {args.output}.*", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"wrote {args.output}.bin/.idx: {documents} documents, {tokens} tokens ({args.tokenizer} tokenizer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
