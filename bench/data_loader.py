"""Data-loader throughput as a ratio to the training throughput of the quickstart model.

    python bench/data_loader.py [--device cpu|cuda] [--corpus-mb 8] [--batches 200] [--no-bpe]

One run measures, on the same machine and corpus (the embedded corpus written as jsonl):
- indexed: batches from a Megatron indexed dataset made by pretrain.data.preprocess (memory-mapped,
  read with megatron-core), in the calling thread (no prefetch: the loader's own rate);
- jsonl: reading the jsonl through `datasets` and tokenizing it (up front, as the loader does for
  text sources) with the byte tokenizer and with a byte-level BPE (8k, trained here on the corpus
  with `tokenizers`), then batches from the tokens;
- training: forward, backward and AdamW steps of configs/quickstart.yaml's model on such batches.
Each loader rate over the training rate must be well above 1 for loading never to stall training
(the background prefetch thread then hides it entirely). On CUDA the loader's batches are pinned
and copied to the device, and the model trains in bf16 autocast.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.model import HybridLM  # noqa: E402
from models.ops import plan_model  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.data import build_data, embedded_corpus  # noqa: E402
from pretrain.data.config import DataConfig  # noqa: E402
from pretrain.data.preprocess import main as preprocess  # noqa: E402
from pretrain.loss import lm_loss  # noqa: E402


def write_jsonl(path: Path, megabytes: int) -> None:
    docs = embedded_corpus(megabytes * 1_000_000)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def train_bpe(jsonl: Path, out: Path, vocab_size: int = 8192) -> str:
    """A byte-level BPE Hugging Face tokenizer trained on the corpus (local, nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator((json.loads(line)["text"] for line in jsonl.open()), trainer)
    tok.save(str(out))
    return str(out)


def loader_rate(data_cfg: DataConfig, train_cfg, vocab: int, batches: int, device: torch.device) -> tuple[float, float]:
    """(seconds to build the loader, training tokens/s of the batches it then produces)."""
    start = time.perf_counter()
    _, loader, _ = build_data(data_cfg, train_cfg, vocab, device=str(device))
    built = time.perf_counter() - start
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(loader)
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        tokens += batch.input_ids.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return built, tokens / (time.perf_counter() - start)


def training_rate(cfg, device: torch.device, steps: int) -> float:
    """Tokens/s of full training steps (one warm-up) of the config's model."""
    model = HybridLM(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = cfg.train
    ids = torch.randint(0, 257, (t.batch_size, t.seq_len + 1), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan_model(model, device, dtype)  # fla or PyTorch per op, as a run's start-up decides
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return t.batch_size * t.seq_len / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--corpus-mb", type=int, default=8, help="size of the jsonl corpus")
    parser.add_argument("--batches", type=int, default=200, help="batches timed per loader")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--no-bpe", action="store_true", help="skip the jsonl row with a BPE tokenizer trained on the corpus")
    parser.add_argument("--workers", type=int, default=2, help="preprocess workers")
    parser.add_argument("--out", default=str(REPO / "bench/results/data_loader.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config(REPO / "configs/quickstart.yaml")
    train = training_rate(cfg, device, args.train_steps)  # first: the tokenizers' thread pool stays around after

    with tempfile.TemporaryDirectory() as tmp:
        jsonl, prefix = Path(tmp, "corpus.jsonl"), str(Path(tmp, "indexed", "corpus"))
        write_jsonl(jsonl, args.corpus_mb)
        start = time.perf_counter()
        preprocess(["--input", str(jsonl), "--output", prefix, "--workers", str(args.workers),
                    "--cache-dir", str(Path(tmp, "cache-preprocess"))])
        preprocess_s = time.perf_counter() - start
        common = dict(val_fraction=0.0, prefetch=0, cache_dir=str(Path(tmp, "cache-byte")))  # each reader its own cache: none reuses another's
        vocab = cfg.model.vocab_size
        _, indexed = loader_rate(DataConfig(path=prefix, **common), cfg.train, vocab, args.batches, device)
        jsonl_build, jsonl_batches = loader_rate(DataConfig(path=str(jsonl), **common), cfg.train, vocab, args.batches, device)
        corpus_tokens = json.loads(Path(f"{prefix}.ebb.json").read_text())["tokens"]
        rows = {
            "indexed loader": indexed,
            "jsonl read + byte tokenize": corpus_tokens / jsonl_build,
            "jsonl loader (after tokenizing)": jsonl_batches,
            "preprocess jsonl to indexed": corpus_tokens / preprocess_s,
        }
        if not args.no_bpe:
            bpe_cfg = DataConfig(path=str(jsonl), tokenizer=train_bpe(jsonl, Path(tmp, "bpe.json")), **common | {"cache_dir": str(Path(tmp, "cache-bpe"))})
            start = time.perf_counter()
            _, bpe_loader, _ = build_data(bpe_cfg, cfg.train, 1 << 16, device=str(device))
            bpe_tokens = sum(u.docs.lengths.sum() for u in bpe_loader.units)
            rows["jsonl read + BPE tokenize (8k)"] = bpe_tokens / (time.perf_counter() - start)

    print(f"quickstart model training: {train:,.0f} tokens/s on {device} ({torch.get_num_threads()} threads); "
          f"corpus {corpus_tokens:,} byte tokens")
    print(f"{'loader':<34}{'tokens/s':>14}{'/ training':>12}")
    for name, rate in rows.items():
        print(f"{name:<34}{rate:>14,.0f}{rate / train:>11.0f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(),
                               "corpus_tokens": corpus_tokens, "training_tokens_per_s": train,
                               "loaders_tokens_per_s": rows, "ratios": {k: v / train for k, v in rows.items()}}, indent=2))


if __name__ == "__main__":
    main()
