"""The tokenizer of an exported model, as Hugging Face tokenizer files.

ebb's byte tokenizer (`pretrain/data/tokenizer.py`: UTF-8 bytes are ids 0-255, 256 ends a
document) becomes a real fast tokenizer (`tokenizer.json`, no remote code) that encodes and decodes
exactly as ebb's does:
- GPT-2's byte-level pre-tokenizer (without its regex split or prefix space) maps each byte to one
  printable character, and a BPE model with no merges gives that character the byte's value as
  its id;
- id 256 is the special token `<|endoftext|>`. The text `<|endoftext|>` itself is encoded as its
  bytes (`split_special_tokens`), as ebb encodes it;
- decoding maps the characters back to bytes and decodes them as UTF-8 with U+FFFD for invalid
  sequences (the maximal-subpart rule, which Python's `errors="replace"` follows too), and the
  eos token decodes to nothing, as ebb's `decode` drops it.
The byte tokenizer's two numbers (257 ids, eos 256) are pretrain's; models/ cannot import pretrain,
and tests/hf checks that both agree.

Any other tokenizer (`data.tokenizer` a local tokenizer.json or Hugging Face directory) is
loaded with transformers and saved into the folder as it is.
"""
from __future__ import annotations

from pathlib import Path

BYTE = "byte"
BYTE_VOCAB_SIZE = 257
BYTE_EOS_ID = 256
BYTE_EOS = "<|endoftext|>"
# pretrain's rule for a Hugging Face tokenizer without an eos_token (pretrain/data/tokenizer.py)
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (what the ByteLevel pre-tokenizer does)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """ebb's byte tokenizer as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.Sequence([decoders.Replace(BYTE_EOS, ""), decoders.ByteLevel()])
    core.add_special_tokens([AddedToken(BYTE_EOS, special=True, normalized=False)])
    assert core.token_to_id(BYTE_EOS) == BYTE_EOS_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=BYTE_EOS, clean_up_tokenization_spaces=False, split_special_tokens=True,
    )


def load_hf_tokenizer(spec: str):
    """A local tokenizer.json or Hugging Face tokenizer directory (never downloads)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    raise FileNotFoundError(f"data.tokenizer {spec} is neither 'byte' nor an existing tokenizer file or directory")


def write_tokenizer(spec: str, folder: Path) -> tuple[int, dict[str, int | None]]:
    """Save the tokenizer `spec` (`data.tokenizer`) into `folder`; its vocabulary size and its
    bos/eos/pad token ids (pad: eos when it has none, for generate())."""
    tokenizer = byte_tokenizer() if spec == BYTE else load_hf_tokenizer(spec)
    tokenizer.save_pretrained(str(folder))
    eos = tokenizer.eos_token_id
    if eos is None:  # the token ebb ended documents with (pretrain's rule)
        vocab = tokenizer.get_vocab()
        eos = next((vocab[token] for token in EOS_CANDIDATES if token in vocab), None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return len(tokenizer), {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}


def is_byte_tokenizer(folder: Path) -> bool:
    """Whether `folder`'s tokenizer is ebb's byte tokenizer (same vocabulary and eos)."""
    if not (folder / "tokenizer.json").is_file():
        return False
    from tokenizers import Tokenizer

    ours = byte_tokenizer()
    theirs = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return theirs.get_vocab(with_added_tokens=True) == ours.get_vocab() and theirs.token_to_id(BYTE_EOS) == BYTE_EOS_ID
