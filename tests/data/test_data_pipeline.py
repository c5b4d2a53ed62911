"""The data pipeline at scale: preprocessing into Megatron's indexed format, blending, data-parallel
sharding in real processes, exact resume through the prefetcher, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pretrain.config import TrainConfig
from pretrain.data import DataError, build_data
from pretrain.data.config import DataConfig, SourceConfig
from pretrain.data.documents import tokenize
from pretrain.data.indexed import sidecar_path
from pretrain.data.loader import PrefetchedBatches, TokenBatches, mixture_record, tokenize_documents
from pretrain.data.preprocess import main as preprocess_main
from pretrain.data.sources import source_kind
from pretrain.data.streaming import held_out
from pretrain.data.tokenizer import ByteTokenizer
from pretrain.train import main as train_main
from tests.distributed import run_distributed

EOS = ByteTokenizer.eos_id
DOCS = [f"record {i}: " + "lorem ipsum " * (i % 7) + "é" * (i % 3) for i in range(200)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def preprocess(tmp_path: Path, docs: list[str], name: str = "corpus", tokenizer: str = "byte", workers: int = 2) -> str:
    src = write_jsonl(tmp_path / f"{name}.jsonl", docs)
    prefix = str(tmp_path / "indexed" / name)
    args = ["--input", str(src), "--output", prefix, "--tokenizer", tokenizer, "--workers", str(workers)]
    assert preprocess_main([*args, "--batch-size", "16", "--cache-dir", str(tmp_path / "hf_cache")]) == 0
    return prefix


def take(batches, n: int) -> list[torch.Tensor]:
    return [next(batches).input_ids for _ in range(n)]


# ---- preprocessing ----

@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["byte", "word-level"])
def test_preprocessed_corpus_reads_back_in_megatron_core_as_direct_tokenization(tmp_path, word_level_tokenizer, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from pretrain.data.tokenizer import load_tokenizer

    docs = DOCS if tokenizer == "byte" else ["hello world", "again", "", "world world hello"] * 10
    if tokenizer != "byte":
        tokenizer = str(word_level_tokenizer)
    tok = load_tokenizer(tokenizer)
    dataset = IndexedDataset(preprocess(tmp_path, docs, tokenizer=tokenizer))
    expected = [tok.encode(d) + [tok.eos_id] for d in docs if d]
    assert len(dataset) == len(expected) == len(dataset.document_indices) - 1
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    assert dataset[0].dtype == np.uint16
    info = json.loads(sidecar_path(dataset.path_prefix).read_text())
    assert info["vocab_size"] == tok.vocab_size and info["eos_id"] == tok.eos_id and info["documents"] == len(expected)


# ---- blending ----

def test_blend_of_two_sources_realises_its_weights_over_10k_sequences():
    a, b = tokenize(ByteTokenizer(), ["a" * 40] * 30, "a"), tokenize(ByteTokenizer(), ["b" * 25] * 30, "b")
    batches = TokenBatches([a, b], 8, 100, seed=0, eos_id=EOS, weights=[0.7, 0.3])
    rows = torch.cat(take(batches, 100))
    from_a = ((rows == ord("a")).any(1) & ~(rows == ord("b")).any(1)).sum().item() / len(rows)
    assert len(rows) == 10_000 and abs(from_a - 0.7) < 0.02
    assert mixture_record(batches) == pytest.approx({"mix/a": 0.7, "mix/b": 0.3}, abs=1e-4)  # the logged mixture


def test_source_kinds_are_told_apart_by_path(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    kinds = {p: source_kind(SourceConfig(path=p)) for p in [None, "hf:org/name", str(tmp_path / "x"), str(tmp_path / "y.idx"), str(tmp_path / "saved"), "c.jsonl"]}
    assert list(kinds.values()) == ["embedded", "hf", "indexed", "indexed", "hf", "files"]


def test_saved_hf_dataset_is_a_source(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": DOCS[:50]}).save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(sources=[{"path": str(tmp_path / "saved")}], val_fraction=0, prefetch=0)
    _, train, _ = build_data(cfg, TrainConfig(seq_len=16, batch_size=2), 320)
    stream = bytes(t for t in next(train).input_ids[0].tolist() if t != EOS).decode(errors="ignore")
    assert "record" in stream or "lorem" in stream


def streamed_config(tmp_path, **kw) -> DataConfig:
    jsonl = write_jsonl(tmp_path / "stream.jsonl", DOCS)
    sources = [{"path": str(jsonl), "streaming": True, "weight": 1}, {"path": None, "weight": 1}]
    return DataConfig(sources=sources, embedded_max_bytes=20_000, cache_dir=str(tmp_path / "c"), **kw)


def test_a_streamed_source_is_its_documents_in_order_epoch_after_epoch(tmp_path):
    source = {"path": str(write_jsonl(tmp_path / "s.jsonl", DOCS[:20])), "streaming": True}
    cfg = DataConfig(sources=[source], val_fraction=0, prefetch=0, cache_dir=str(tmp_path / "c"))
    _, train, val = build_data(cfg, TrainConfig(seq_len=16, batch_size=2), 320)
    stream = [t for d in DOCS[:20] for t in [*d.encode(), EOS]]
    rows = [row.tolist() for b in take(train, 30) for row in b]
    endless = stream * (1 + 60 * 16 // len(stream))
    assert rows == [endless[j * 16 : j * 16 + 16] for j in range(60)] and val == []


def test_streamed_source_holds_out_documents_and_resumes_exactly_in_a_blend(tmp_path):
    cfg, t = streamed_config(tmp_path, val_fraction=0.2, prefetch=2), TrainConfig(seq_len=16, batch_size=3, eval_batches=1)
    _, uninterrupted, val = build_data(cfg, t, 320)
    reference = take(uninterrupted, 12)
    kept = [d for i, d in enumerate(DOCS) if not held_out(0, i, 0.2)]
    first_held_out = next(d for i, d in enumerate(DOCS) if held_out(0, i, 0.2))
    assert 0 < len(kept) < len(DOCS) and val[0].input_ids[0].tolist() == list(first_held_out.encode()[:16])
    stream = [t for d in kept for t in [*d.encode(), EOS]]
    streamed_rows = torch.cat(reference)[0::2]  # equal weights: the blend alternates, the stream first
    assert streamed_rows.tolist() == [stream[j * 16 : j * 16 + 16] for j in range(18)]
    interrupted = build_data(cfg, t, 320)[1]
    take(interrupted, 7)
    state = interrupted.state_dict()
    interrupted.close()
    resumed = build_data(cfg, t, 320)[1]
    resumed.load_state_dict(state)
    assert state["streams"]["0"]["doc"] > 0 and all(torch.equal(x, y) for x, y in zip(take(resumed, 5), reference[7:]))


# ---- data parallelism ----

def blend_config(prefix: str, jsonl: str, packing: str) -> DataConfig:
    sources = [{"path": prefix, "weight": 0.6}, {"path": jsonl, "weight": 0.4}]
    return DataConfig(sources=sources, packing=packing, val_fraction=0.05, prefetch=2)


def rank_batches(prefix: str, jsonl: str, steps: int) -> dict[str, list[torch.Tensor]]:
    """This rank's first `steps` batches under dp = world size: packed rows (4 rows per global batch)
    and varlen (one pack of at most 2 x 16 tokens per rank)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out = {}
    for packing in ("rows", "varlen"):
        train_cfg = TrainConfig(seq_len=16, batch_size=4 // world if packing == "rows" else 2, seed=3)
        _, batches, _ = build_data(blend_config(prefix, jsonl, packing), train_cfg, 320, rank, world)
        out[packing] = take(batches, steps)
        batches.close()
    return out


@pytest.mark.distributed
def test_two_data_parallel_processes_read_disjoint_halves_of_one_process_batches(tmp_path):
    rng = np.random.default_rng(0)  # random letters: no two rows alike, so equal rows would be the same row
    random_docs = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(5, 60))) for _ in range(400)]
    prefix = preprocess(tmp_path, random_docs[:200])
    jsonl = str(write_jsonl(tmp_path / "other.jsonl", random_docs[200:]))
    one = rank_batches(prefix, jsonl, 8)
    ranks = run_distributed(rank_batches, 2, prefix, jsonl, 8)
    for step in range(8):
        assert torch.equal(torch.cat([r["rows"][step] for r in ranks]), one["rows"][step])
        # varlen: one pack per rank per step from the same global sequence of packs
        assert torch.equal(ranks[step % 2]["varlen"][step // 2], one["varlen"][step])
    rows0, rows1 = (torch.cat(r["rows"]) for r in ranks)
    assert not any(torch.equal(x, y) for x in rows0 for y in rows1)  # disjoint


# ---- resume ----

@pytest.mark.slow
@pytest.mark.parametrize("k", [3, 11])
def test_interrupted_and_resumed_loader_yields_the_next_five_batches_of_the_uninterrupted_one(tmp_path, k):
    """Through the prefetcher (which has read ahead when the state is taken), with a blend."""
    prefix = preprocess(tmp_path, DOCS, workers=1)
    cfg = DataConfig(sources=[{"path": prefix, "weight": 2}, {"path": None, "weight": 1}], embedded_max_bytes=20_000, prefetch=3)
    t = TrainConfig(seq_len=16, batch_size=3, seed=7)
    uninterrupted = build_data(cfg, t, 320)[1]
    reference = take(uninterrupted, k + 5)
    interrupted = build_data(cfg, t, 320)[1]
    take(interrupted, k)
    state = interrupted.state_dict()
    assert isinstance(interrupted, PrefetchedBatches) and state["position"] == 3 * k
    interrupted.close()
    resumed = build_data(cfg, t, 320)[1]
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 5), reference[k:]))


def test_resume_under_another_dp_size_continues_without_repeating_or_skipping(tmp_path):
    docs = tokenize_documents(ByteTokenizer(), DOCS)
    single = TokenBatches(docs, 16, 4, seed=0, eos_id=EOS)
    reference = torch.cat(take(single, 10))
    single = TokenBatches(docs, 16, 4, seed=0, eos_id=EOS)
    before = take(single, 4)
    halves = [TokenBatches(docs, 16, 2, seed=0, eos_id=EOS, dp_rank=r, dp_size=2) for r in range(2)]
    for half in halves:
        half.load_state_dict(single.state_dict())
    after = [torch.cat([next(h).input_ids for h in halves]) for _ in range(6)]
    assert torch.equal(torch.cat(before + after), reference)


# ---- bad input ----

def run_cli(tmp_path, capsys, *overrides: str) -> str:
    capsys.readouterr()  # drop what came before
    tiny = ["model.d_model=32", "model.pattern=M", "model.vocab_size=320", "train.steps=1", "train.seq_len=16", "train.batch_size=2"]
    code = train_main([*tiny, f"train.run_dir={tmp_path / 'run'}", "logging.progress=false", "logging.tensorboard=false", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.slow
def test_an_idx_that_does_not_match_its_bin_stops_the_run_before_training(tmp_path, capsys):
    prefix = preprocess(tmp_path, DOCS, workers=1)
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(Path(f"{prefix}.bin").stat().st_size - 2)
    assert "does not match" in run_cli(tmp_path, capsys, f"data.path={prefix}")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_bad_indexed_sources_are_one_line_errors(tmp_path):
    prefix = preprocess(tmp_path, DOCS, workers=1)
    t = TrainConfig(seq_len=16, batch_size=2)
    Path(f"{prefix}.idx").rename(tmp_path / "moved.idx")
    with pytest.raises(DataError, match=r"corpus.idx does not exist"):
        build_data(DataConfig(path=f"{prefix}.bin"), t, 320)
    (tmp_path / "moved.idx").rename(f"{prefix}.idx")
    with pytest.raises(DataError, match=r"tokenized with byte \(257 tokens\) but model.vocab_size is 256"):
        _indexed_vocab_check(prefix, 256)
    sidecar_path(prefix).unlink()
    with pytest.raises(DataError, match=r"holds token id 256 but model.vocab_size is 200"):
        _indexed_vocab_check(prefix, 200)


def _indexed_vocab_check(prefix: str, model_vocab: int) -> None:
    """The indexed-data vocabulary check alone (build_data checks the tokenizer's vocabulary first)."""
    from pretrain.data.sources import open_source

    open_source(SourceConfig(path=prefix), DataConfig(), TrainConfig(), ByteTokenizer(), model_vocab)


@pytest.mark.slow
def test_empty_sources_are_one_line_errors(tmp_path):
    empty = preprocess(tmp_path, ["x"], name="one", workers=1)
    (tmp_path / "empty.jsonl").write_text("")
    assert preprocess_main(["--input", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "e"), "--cache-dir", str(tmp_path / "c")]) == 2
    t = TrainConfig(seq_len=16, batch_size=2)
    with pytest.raises(DataError, match="empty.jsonl holds no non-empty documents"):
        build_data(DataConfig(path=str(tmp_path / "empty.jsonl"), cache_dir=str(tmp_path / "c")), t, 320)
    with pytest.raises(DataError, match="one has 2 training tokens, too few for one row"):
        build_data(DataConfig(path=empty, val_fraction=0), t, 320)


def test_missing_files_and_a_too_large_tokenizer_stop_the_cli(tmp_path, capsys):
    assert "no-such.jsonl: no such file" in run_cli(tmp_path, capsys, f"data.path={tmp_path / 'no-such.jsonl'}")
    assert "has 257 tokens but model.vocab_size is 100" in run_cli(tmp_path, capsys, "model.vocab_size=100")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetched_batches_are_pinned_for_asynchronous_copies_on_cuda():
    _, batches, _ = build_data(DataConfig(embedded_max_bytes=20_000), TrainConfig(seq_len=16, batch_size=2), 320, device="cuda")
    batch = next(batches)
    assert batch.input_ids.is_pinned() and batch.labels.is_pinned() and batch.cu_seqlens.is_pinned()
    assert torch.equal(batch.to("cuda", non_blocking=True).input_ids.cpu(), batch.input_ids)
