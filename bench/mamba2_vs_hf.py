"""Training throughput of a Mamba2-only ebb model vs transformers' Mamba2ForCausalLM (its
PyTorch path) of the same shape, on CPU, with MFU against a matmul peak measured in this run.

    python bench/mamba2_vs_hf.py [--seq-len 2048] [--steps 5] [--threads N]

Both models run the same training step (forward, float32 cross-entropy, backward, AdamW step)
on the same tokens; steps alternate between the two so that machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.model import HybridLM
from pretrain.peak_flops import measure_matmul_peak

SHAPE = dict(d_model=512, n_layers=4, d_state=64, head_dim=64, expand=2, chunk_size=64, vocab_size=256)


def build_ebb() -> torch.nn.Module:
    cfg = ModelConfig(
        pattern="M" * SHAPE["n_layers"],
        d_model=SHAPE["d_model"],
        vocab_size=SHAPE["vocab_size"],
        mlp="none",
        mixers={"mamba2": {k: SHAPE[k] for k in ("d_state", "head_dim", "expand", "chunk_size")}},
    )
    return HybridLM(cfg)


def build_hf() -> torch.nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    d_inner = SHAPE["expand"] * SHAPE["d_model"]
    cfg = Mamba2Config(
        vocab_size=SHAPE["vocab_size"],
        hidden_size=SHAPE["d_model"],
        num_hidden_layers=SHAPE["n_layers"],
        state_size=SHAPE["d_state"],
        head_dim=SHAPE["head_dim"],
        num_heads=d_inner // SHAPE["head_dim"],
        expand=SHAPE["expand"],
        n_groups=1,
        chunk_size=SHAPE["chunk_size"],
        tie_word_embeddings=True,
        use_cache=False,
    )
    return Mamba2ForCausalLM(cfg)


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def make_step(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        logits = logits_of(model, ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench/results/mamba2_vs_hf.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ids = torch.randint(0, SHAPE["vocab_size"], (1, args.seq_len + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    models = {"ebb": build_ebb(), "transformers": build_hf()}
    steps = {name: make_step(model, inputs, labels) for name, model in models.items()}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(step())

    peak = measure_matmul_peak()
    train_flops_per_token = 3 * models["ebb"].flops_per_token(args.seq_len)
    rows = {}
    for name, ts in times.items():
        tok_s = args.seq_len / statistics.median(ts)
        rows[name] = {
            "params": sum(p.numel() for p in models[name].parameters()),
            "tokens_per_s": tok_s,
            "mfu": tok_s * train_flops_per_token / peak,
        }
    speedup = rows["ebb"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]

    print(f"Mamba2 {SHAPE} T={args.seq_len} threads={torch.get_num_threads()} matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<14}{'params':>12}{'tokens/s':>12}{'MFU':>8}")
    for name, row in rows.items():
        print(f"{name:<14}{row['params']:>12,}{row['tokens_per_s']:>12.0f}{row['mfu']:>8.1%}")
    print(f"ebb / transformers tokens/s: {speedup:.2f}x")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"shape": SHAPE, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
              "matmul_peak_flops": peak, "models": rows, "speedup": speedup}
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
