"""Tokenizers behind one small interface: the built-in byte tokenizer or a local Hugging Face one."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from common.errors import first_line
from pretrain.data.errors import DataError

# Tried in order when a Hugging Face tokenizer declares no eos_token.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; 256 ends a document."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]


class HFTokenizer:
    """A transformers tokenizer; documents are encoded without special tokens (ebb appends eos itself)."""

    def __init__(self, tokenizer: Any, name: str):
        self._tok = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id = _find_eos_id(tokenizer, name)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([i for i in ids if i != self.eos_id])

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        ids = self._tok(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(row, dtype=np.int64) for row in ids]


def _find_eos_id(tokenizer: Any, name: str) -> int:
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    for token in EOS_CANDIDATES:
        if token in vocab:
            return vocab[token]
    raise DataError(f"tokenizer {name} has no end-of-document token (no eos_token and none of {', '.join(EOS_CANDIDATES)})")


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """'byte', or a local tokenizer.json file or Hugging Face tokenizer directory (never downloads)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data.tokenizer: {spec} is neither 'byte' nor an existing tokenizer file or directory")
    import transformers  # slow import, only for Hugging Face tokenizers

    try:
        if path.is_dir():
            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as exc:  # the tokenizers library raises a bare Exception for a malformed file
        raise DataError(f"data.tokenizer: cannot load {spec}: {first_line(exc)}") from None
    return HFTokenizer(tok, spec)
