"""The data pipeline: tokenizers, document sources, the train/validation split, packing and resumption."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pretrain.config import TrainConfig
from pretrain.data import DataError, build_data, embedded_corpus, load_documents, load_tokenizer
from pretrain.data.config import DataConfig
from pretrain.data.corpus import stdlib_sources
from pretrain.data.documents import concatenated
from pretrain.data.loader import TokenBatches, eval_batches, split_documents, tokenize_documents
from pretrain.data.tokenizer import ByteTokenizer
from pretrain.loss import IGNORE_INDEX

EOS = ByteTokenizer.eos_id
DOCS = [f"document {i}: " + "abcdefghij"[i % 10] * (5 + 7 * i % 23) + " ünïcödé" * (i % 3) for i in range(30)]


def data_cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "hf_cache"), **kw)


def read_docs(tmp_path, path, text_key="text") -> list[str]:
    return load_documents(path, "auto", text_key, str(tmp_path / "hf_cache"))


def batches(docs=DOCS, seq_len=16, batch_size=3, seed=0) -> TokenBatches:
    return TokenBatches(tokenize_documents(ByteTokenizer(), docs), seq_len, batch_size, seed, EOS)


def take(it: TokenBatches, n: int) -> list:
    return [next(it) for _ in range(n)]


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels) and torch.equal(x.cu_seqlens, y.cu_seqlens)
        for x, y in zip(a, b)
    )


# ---- tokenizers ----

def test_byte_tokenizer_round_trip_including_non_ascii():
    tok = load_tokenizer("byte")
    text = "héllo wörld — 日本語 🙂\n\ttabs"
    ids = tok.encode(text)
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert ids == list(text.encode("utf-8")) and len(ids) > len(text)
    assert tok.decode(ids + [tok.eos_id]) == text
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    assert [a.tolist() for a in tok.encode_batch(["ab", "é"])] == [[97, 98], [0xC3, 0xA9]]


@pytest.mark.parametrize("as_directory", [False, True])
def test_hf_tokenizer_loads_from_local_tokenizer_json(word_level_tokenizer, as_directory):
    tok = load_tokenizer(str(word_level_tokenizer.parent if as_directory else word_level_tokenizer))
    assert tok.vocab_size == 5 and tok.eos_id == 1
    assert tok.encode("hello world again") == [2, 3, 4]
    assert tok.encode("hello zebra") == [2, 0]
    assert [a.tolist() for a in tok.encode_batch(["world", "again hello"])] == [[3], [4, 2]]
    assert tok.decode([2, 1, 3]).split() == ["hello", "world"]


def test_missing_tokenizer_path_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="nowhere.json") as err:
        load_tokenizer(str(tmp_path / "nowhere.json"))
    assert "\n" not in str(err.value)


# ---- document sources ----

def test_jsonl_source_reads_the_text_key(tmp_path):
    rows = [{"body": "first doc", "id": 1}, {"body": "second\ndoc", "id": 2}, {"body": "", "id": 3}, {"body": "third", "id": 4}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = read_docs(tmp_path, str(tmp_path / "d.jsonl"), "body")
    assert docs == ["first doc", "second\ndoc", "third"]
    assert any((tmp_path / "hf_cache").iterdir())  # datasets wrote to the cache we gave, not the user's


def test_text_files_are_whole_documents_from_a_directory_or_glob(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("bee line 1\nbee line 2\n")
    (corpus / "a.txt").write_text("ay\n\nstill ay\n")
    (corpus / "sub" / "c.txt").write_text("sea")
    (corpus / "notes.csv").write_text("ignored,because,unknown,extension")
    expected = ["ay\n\nstill ay\n", "bee line 1\nbee line 2\n", "sea"]
    assert read_docs(tmp_path, str(corpus)) == expected
    assert read_docs(tmp_path, str(corpus / "*.txt")) == expected[:2]
    assert read_docs(tmp_path, [str(corpus / "sub" / "c.txt"), str(corpus / "a.txt")]) == ["sea", expected[0]]


def test_parquet_source(tmp_path):
    pq.write_table(pa.table({"text": ["p one", "p two", None], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert read_docs(tmp_path, str(tmp_path / "d.parquet")) == ["p one", "p two"]


def test_bad_sources_are_one_line_errors_naming_the_cause(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "nums.jsonl").write_text('{"text": 3}\n')
    cases = [
        (str(tmp_path / "missing.jsonl"), "text", "missing.jsonl: no such file"),
        (str(tmp_path / "nothing*.jsonl"), "text", "matches no files"),
        (str(tmp_path / "d.jsonl"), "text", r"'text' is not a column of .*d.jsonl \(columns: body\)"),
        (str(tmp_path / "empty.jsonl"), "text", "empty.jsonl holds no non-empty documents"),
        (str(tmp_path / "blank.jsonl"), "text", "blank.jsonl holds no non-empty documents"),
        (str(tmp_path / "nums.jsonl"), "text", "'text' of .*nums.jsonl is not a text column"),
    ]
    for path, key, message in cases:
        with pytest.raises(DataError, match=message) as err:
            read_docs(tmp_path, path, key)
        assert "\n" not in str(err.value)


def test_embedded_corpus_is_deterministic_stdlib_source():
    docs = embedded_corpus(300_000)
    assert len(docs) > 5 and docs == embedded_corpus(300_000)
    assert 290_000 < sum(len(d.encode()) for d in docs) <= 300_000
    assert any("def " in d for d in docs)
    assert not any({"test", "tests", "site-packages"} & set(p.parts) for p in stdlib_sources())


# ---- split ----

def test_split_is_disjoint_deterministic_and_seeded():
    train, val = split_documents(100, 0.1, seed=3)
    assert len(val) == 10 and sorted([*train, *val]) == list(range(100)) and not set(train) & set(val)
    assert all(np.array_equal(a, b) for a, b in zip(split_documents(100, 0.1, seed=3), (train, val)))
    assert not np.array_equal(split_documents(100, 0.1, seed=4)[1], val)
    assert split_documents(2, 0.01, seed=0)[1].tolist() in ([0], [1])
    assert split_documents(2, 0.0, seed=0)[0].tolist() == [0, 1] and split_documents(2, 0.0, seed=0)[1].size == 0
    assert split_documents(1, 0.5, seed=0)[1].size == 0


# ---- packing ----

def check_packed(batch, seq_len: int) -> None:
    inputs, labels, cu = batch.input_ids, batch.labels, batch.cu_seqlens.tolist()
    assert inputs.dtype == labels.dtype == torch.long and batch.cu_seqlens.dtype == torch.int32
    flat = inputs.flatten()
    expected_starts = {0, flat.numel()} | set(range(0, flat.numel(), seq_len))
    expected_starts |= {i + 1 for i in (flat == EOS).nonzero().flatten().tolist()}
    assert cu == sorted(expected_starts)  # every boundary is a row start or follows an eos, and all are there
    assert torch.equal(labels == IGNORE_INDEX, inputs == EOS)
    keep = labels[:, :-1] != IGNORE_INDEX
    assert torch.equal(labels[:, :-1][keep], inputs[:, 1:][keep])  # labels are the stream shifted by one
    assert torch.equal(labels[:-1, -1][inputs[:-1, -1] != EOS], inputs[1:, 0][inputs[:-1, -1] != EOS])  # rows overlap by one


def test_packing_is_a_shuffled_concatenation_of_whole_documents():
    seq_len, bs = 16, 3
    it = batches(seq_len=seq_len, batch_size=bs)
    epoch0 = take(it, it.rows_per_epoch // bs)
    for b in epoch0:
        check_packed(b, seq_len)
    for prev, nxt in zip(epoch0, epoch0[1:]):  # consecutive batches continue the stream
        ends_document = prev.input_ids[-1, -1] == EOS
        assert prev.labels[-1, -1].item() == (IGNORE_INDEX if ends_document else nxt.input_ids[0, 0].item())
    stream = torch.cat([b.input_ids.flatten() for b in epoch0]).tolist()
    pieces = bytes(t if t != EOS else 0 for t in stream).split(b"\0")
    complete = [p.decode() for p in pieces[1:-1]]  # the first piece is a whole document too: epochs start at one
    assert pieces[0].decode() in DOCS and all(p in DOCS for p in complete)
    assert len(set(complete)) == len(complete) and len(complete) > 10
    assert complete != sorted(complete, key=DOCS.index)  # shuffled, not in file order


def test_same_seed_same_batches_other_seed_other_batches_and_epochs_reshuffle():
    it = batches()
    per_epoch = it.rows_per_epoch // 3
    first = take(it, 2 * per_epoch + 1)
    assert same_batches(first, take(batches(), 2 * per_epoch + 1))
    assert not same_batches(first[:3], take(batches(seed=1), 3))
    rows = it.units[0]
    assert not np.array_equal(rows.unit(0), rows.unit(rows.rows_per_epoch))  # epoch 1 is another order


@pytest.mark.parametrize("k", [0, 4, -2])
def test_resume_continues_exactly(k):
    """k < 0 stops |k| batches before the end of the first epoch, so the five batches cross into the next."""
    original = batches()
    per_epoch = original.rows_per_epoch // 3
    take(original, k % per_epoch)
    state = original.state_dict()
    resumed = batches()
    resumed.load_state_dict(state)
    assert same_batches(take(resumed, 5), take(original, 5))
    assert (original.blend.position > original.rows_per_epoch) == (k < 0)
    with pytest.raises(DataError, match="sources="):
        batches(docs=DOCS[:-1]).load_state_dict(state)


def test_eval_batches_are_fixed_bounded_and_packed():
    docs = tokenize_documents(ByteTokenizer(), DOCS)
    ids = [np.arange(len(DOCS))]
    val = eval_batches([docs], ids, 16, 4, 3, EOS)
    assert [b.input_ids.shape[0] for b in val] == [4, 4, 4]
    assert same_batches(val, eval_batches([docs], ids, 16, 4, 3, EOS))
    for b in val:
        check_packed(b, 16)
    tokens = torch.from_numpy(concatenated(docs, ids[0]).astype(np.int64))
    rows = (len(tokens) - 1) // 16
    all_val = eval_batches([docs], ids, 16, 4, 1000, EOS)
    assert sum(b.input_ids.shape[0] for b in all_val) == rows and all_val[-1].input_ids.shape[0] == (rows % 4 or 4)
    assert torch.equal(torch.cat([b.input_ids.flatten() for b in all_val]), tokens[: rows * 16])
    assert eval_batches([docs], [np.arange(0)], 16, 4, 3, EOS) == []


# ---- build_data ----

def test_build_data_end_to_end(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 4))
    cfg = data_cfg(tmp_path, path=str(tmp_path / "d.jsonl"), val_fraction=0.1)
    train_cfg = TrainConfig(seq_len=32, batch_size=2, eval_batches=2, seed=5)
    tok, train, val = build_data(cfg, train_cfg, model_vocab_size=300)
    batch = next(train)
    assert tok.vocab_size == 257 and batch.input_ids.shape == (2, 32) and len(val) == 2
    assert same_batches(val, build_data(cfg, train_cfg, 300)[2])


def test_build_data_rejects_a_tokenizer_larger_than_the_model_vocab(tmp_path):
    with pytest.raises(DataError, match=r"has 257 tokens but model.vocab_size is 256"):
        build_data(data_cfg(tmp_path), TrainConfig(), model_vocab_size=256)


def test_a_corpus_too_small_for_one_row_is_an_error(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "tiny"}) + "\n")
    cfg = data_cfg(tmp_path, path=str(tmp_path / "d.jsonl"))
    with pytest.raises(DataError, match="d.jsonl has 5 training tokens, too few for one row of train.seq_len=512"):
        build_data(cfg, TrainConfig(), model_vocab_size=257)
