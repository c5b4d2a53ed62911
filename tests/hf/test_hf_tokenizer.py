"""The exported byte tokenizer encodes and decodes exactly as ebb's ByteTokenizer (eos dropped on
decode, the text `<|endoftext|>` encoded as bytes, invalid UTF-8 replaced alike); a run's own
Hugging Face tokenizer is copied as it is; from-hf recognises the byte tokenizer."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from models.hf.tokenizer import BYTE_EOS_ID, BYTE_VOCAB_SIZE, byte_tokenizer
from pretrain.data.tokenizer import ByteTokenizer, load_tokenizer
from tests.hf.helpers import from_hf, save_checkpoint, small_config, small_model, to_hf

TEXTS = [
    "hello world", "  two  spaces\n\ttab\r\n", "héllo wörld ✓ 日本語 😀", "<|endoftext|> in the text", "a<|endoftext|>b",
    "", "\x00\x01\x7f", "def main(\n    return 0\n", " ." * 5 + " ,'s n't",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    to_hf(save_checkpoint(tmp / "run", small_model(small_config("*"))), tmp / "hf")
    return tmp / "hf"


def test_byte_tokenizer_numbers_are_pretrains() -> None:
    ebb = ByteTokenizer()
    assert (BYTE_VOCAB_SIZE, BYTE_EOS_ID) == (ebb.vocab_size, ebb.eos_id)


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_round_trips_as_ebbs(folder: Path, trust_remote_code: bool) -> None:
    ebb, hf = ByteTokenizer(), AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    assert len(hf) == ebb.vocab_size and hf.eos_token_id == ebb.eos_id
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ids == hf.encode(text) == ebb.encode(text), text
        assert hf.decode(ids) == ebb.decode(ids) == text, text
    assert hf(TEXTS)["input_ids"] == [ebb.encode(t) for t in TEXTS]
    rng = random.Random(0)
    for _ in range(500):  # any ids, eos and invalid UTF-8 among them
        ids = [rng.randrange(ebb.vocab_size) for _ in range(rng.randrange(12))]
        assert hf.decode(ids) == ebb.decode(ids), ids


def test_a_runs_hugging_face_tokenizer_is_copied(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "words.json"))
    to_hf(save_checkpoint(tmp_path / "run", small_model(small_config("*")), tokenizer=str(tmp_path / "words.json")), tmp_path / "hf")
    theirs = load_tokenizer(str(tmp_path / "words.json"))
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported.encode("hello world there", add_special_tokens=False) == theirs.encode("hello world there") == [1, 2, 0]
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == theirs.eos_id == 3 and generation["suppress_tokens"] == list(range(4, 320))


def test_from_hf_recognises_the_byte_tokenizer(folder: Path, tmp_path: Path) -> None:
    from_hf(folder, tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["tokenizer"] == "byte"
    byte_tokenizer().save_pretrained(tmp_path / "saved")  # what to-hf writes, read back
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").encode("ok") == [111, 107]
