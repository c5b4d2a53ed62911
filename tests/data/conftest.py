"""Fixtures of the data tests."""
from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers


@pytest.fixture
def word_level_tokenizer(tmp_path: Path) -> Path:
    """A tokenizer.json of 5 words ([UNK] 0, </s> 1, hello, world, again), split on whitespace."""
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path
