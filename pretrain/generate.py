"""Sample from a trained HybridLM: prefill the prompt through the state cache, then decode token by token.

    python -m pretrain.generate --checkpoint RUN_OR_CHECKPOINT_DIR --prompt "def main(" \
        [--max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 0 --device auto]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from checkpoint import CheckpointError, intact_checkpoint, load_model
from models.model import HybridLM
from models.ops import plan_model
from pretrain.config import ConfigError, RunConfig, load_config
from pretrain.data import DataError, load_tokenizer
from pretrain.data.tokenizer import Tokenizer


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / temperature) over the top_k logits."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(
    model: HybridLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The new tokens after `prompt_ids` (non-empty), stopping before `eos_id` or after `max_new_tokens`.
    Only ids below `vocab_size` (the tokenizer's; the model's vocabulary is padded) are sampled."""
    device = next(model.parameters()).device
    cache = model.new_cache()
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[0, -1]
    new: list[int] = []
    while len(new) < max_new_tokens:
        token = sample_next(logits[:vocab_size], temperature, top_k, generator)
        if token == eos_id:
            break
        new.append(token)
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
    return new


def saved_config(checkpoint: Path, given: Path) -> RunConfig:
    """The config saved in the checkpoint, else the run directory's config.yaml."""
    for path in (checkpoint / "config.yaml", given / "config.yaml"):
        if path.is_file():
            return load_config(path)
    raise CheckpointError(f"no config.yaml in {checkpoint} or {given}: cannot rebuild the model")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run dir, its checkpoints dir, or one step-* checkpoint")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def load_trained(path: Path, device: str | torch.device, dtype: torch.dtype = torch.float32) -> tuple[RunConfig, HybridLM, Tokenizer]:
    """The run config, model (in eval mode on `device`) and tokenizer of the checkpoint at `path`
    (a run dir, its checkpoints dir or one step-*), verified against its manifest as --resume
    does; its ops planned for `dtype` (the autocast dtype; float32: none), as training plans them."""
    checkpoint = intact_checkpoint(path)
    cfg = saved_config(checkpoint, path)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = HybridLM(cfg.model)
    load_model(checkpoint, model)
    model.to(device).eval()
    plan_model(model, torch.device(device), dtype)  # fla or PyTorch per op, checked once
    return cfg, model, tokenizer


def check_one_process() -> None:
    """Decoding is one process: under torchrun every rank would decode the whole prompt alone. A
    checkpoint trained under any layout (context parallelism included) loads here whole."""
    if (world := int(os.environ.get("WORLD_SIZE", "1"))) > 1:
        raise ConfigError(
            f"pretrain.generate decodes in one process, not {world} (WORLD_SIZE): run it without torchrun; "
            "a checkpoint saved under parallel.cp, tp, pp or dp loads whole in one process"
        )


def run(args: argparse.Namespace) -> str:
    check_one_process()
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1) or args.max_new_tokens < 0:
        raise ConfigError("--temperature must be >= 0, --top-k >= 1 and --max-new-tokens >= 0")
    _, model, tokenizer = load_trained(args.checkpoint, args.device)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ConfigError("--prompt is empty: give at least one token of context")
    generator = torch.Generator(args.device).manual_seed(args.seed)
    new = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, tokenizer.eos_id, tokenizer.vocab_size, generator)
    return tokenizer.decode(prompt_ids + new)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ebb: SIGINT: stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
