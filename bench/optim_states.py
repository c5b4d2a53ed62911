"""Low-bit optimizer states: state bytes per parameter, optimizer-step time against torch's fused
AdamW (same run), and the peak memory of a training step, per `optim.state_dtype`.

    python bench/optim_states.py                                  # quickstart model, CPU
    python bench/optim_states.py --device cuda --size 350m        # ~350M-param hybrid on a GPU

Every dtype uses the config's defaults (tensors under 4096 elements keep fp32 states). Bytes/param counts the moments and their scales (not the step counter): over the
quantised tensors alone (targets: fp32 8, int8 <= 2.1, fp8 <= 2.2) and over the whole model.
Step time is the median of --repeats optimizer steps on fixed random gradients, the dtypes and
torch's fused AdamW taking turns; on CUDA int8 runs bitsandbytes' fused kernel, and
bitsandbytes' own AdamW8bit is timed too. Peak memory is one forward/backward/step of a
--batch-size x --seq-len batch after two warm-up steps: CUDA's max allocated bytes, or on CPU
the growth of the resident set of a fresh process per dtype (the process peak cannot be reset).
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from models.config import ModelConfig
from models.model import HybridLM
from optim.adamw import build_optimizer
from optim.codecs import CODECS
from optim.config import OptimConfig
from pretrain.config import load_config
from pretrain.loss import lm_loss

REPO = Path(__file__).resolve().parents[1]
STATE_DTYPES = tuple(CODECS)
SIZE_350M = {"pattern": "MTG* " * 6, "d_model": 1024, "vocab_size": 32768, "tie_embeddings": True}


def model_config(size: str) -> tuple[ModelConfig, OptimConfig]:
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    if size == "quickstart":
        return cfg.model, cfg.optim
    return cfg.model.model_copy(update=SIZE_350M), cfg.optim


def build(size: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    return HybridLM(model_config(size)[0]).to(device)


def optimizer_for(name: str, model: nn.Module, size: str) -> torch.optim.Optimizer:
    optim_cfg = model_config(size)[1]
    if name == "torch_fused":
        return torch.optim.AdamW(model.parameters(), lr=optim_cfg.lr, betas=optim_cfg.betas, fused=True)
    if name == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=optim_cfg.lr, betas=optim_cfg.betas)
    return build_optimizer(model, optim_cfg.model_copy(update={"state_dtype": name}))


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Bytes of moments and scales per parameter: over all tensors, and over the quantised ones
    (bitsandbytes' shared maps are not counted)."""
    total_bytes = total_params = quant_bytes = quant_params = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            nbytes = sum(v.numel() * v.element_size() for k, v in state.items() if k not in ("step", "master", "qmap1", "qmap2"))
            total_bytes, total_params = total_bytes + nbytes, total_params + p.numel()
            if CODECS[group.get("state_dtype", "fp32")].block is not None:  # a block-quantising codec
                quant_bytes, quant_params = quant_bytes + nbytes, quant_params + p.numel()
    return {"bytes_per_param": total_bytes / total_params, "bytes_per_quantised_param": quant_bytes / quant_params if quant_params else None}


def fill_gradients(model: nn.Module) -> None:
    gen = torch.Generator(device="cpu").manual_seed(1)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.device)


def time_step(optimizer: torch.optim.Optimizer, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_times(names: list[str], size: str, device: str, repeats: int) -> dict[str, dict]:
    """Median optimizer-step seconds per optimizer, taking turns; state sizes after the first step."""
    runs = {}
    for name in names:
        model = build(size, device)
        fill_gradients(model)
        optimizer = optimizer_for(name, model, size)
        time_step(optimizer, device)  # creates the state
        runs[name] = (model, optimizer, [])
    for _ in range(repeats):
        for name, (_, optimizer, times) in runs.items():
            times.append(time_step(optimizer, device))
    return {name: {"step_ms": 1e3 * statistics.median(times), **state_bytes_per_param(optimizer)} for name, (_, optimizer, times) in runs.items()}


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    lm_loss(model(batch[:, :-1]), batch[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_memory_mb(name: str, size: str, device: str, batch_size: int, seq_len: int) -> float:
    """Peak memory of one training step (after two warm-up steps), model and optimizer included."""
    model = build(size, device)
    optimizer = optimizer_for(name, model, size)
    vocab = model.embed.num_embeddings
    batch = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    if device == "cuda":
        for _ in range(2):
            training_step(model, optimizer, batch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        training_step(model, optimizer, batch)
        return torch.cuda.max_memory_allocated() / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        training_step(model, optimizer, batch)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10


def peak_memory_in_fresh_process(name: str, size: str, device: str, batch_size: int, seq_len: int) -> float:
    if device == "cuda":
        gc.collect()  # the previous optimizer's model and states, before the peak is reset
        torch.cuda.empty_cache()
        return peak_memory_mb(name, size, device, batch_size, seq_len)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peak_memory_mb, (name, size, device, batch_size, seq_len))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=["quickstart", "350m"], default="quickstart")
    parser.add_argument("--repeats", type=int, default=5, help="timed optimizer steps per optimizer (after one that creates the state)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default bench/results/optim_states_<device>_<size>.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["torch_fused", *STATE_DTYPES]
    if args.device == "cuda":
        try:
            import bitsandbytes  # noqa: F401

            names.append("bnb_adamw8bit")
        except ImportError:
            pass
    rows = step_times(names, args.size, args.device, args.repeats)
    for name in names:
        rows[name]["vs_torch_fused"] = rows[name]["step_ms"] / rows["torch_fused"]["step_ms"]
        rows[name]["peak_step_mb"] = peak_memory_in_fresh_process(name, args.size, args.device, args.batch_size, args.seq_len)

    with torch.device("meta"):
        params = sum(p.numel() for p in HybridLM(model_config(args.size)[0]).parameters())
    print(f"optimizer states, {args.size} model ({params / 1e6:.1f}M params), {args.device}, threads {torch.get_num_threads()}, "
          f"step time median of {args.repeats}, peak memory of a {args.batch_size}x{args.seq_len} training step")
    print(f"{'optimizer':<15}{'B/param':>9}{'B/quant. param':>16}{'step ms':>10}{'vs fused':>10}{'peak MB':>10}")
    for name, row in rows.items():
        quant = "-" if row["bytes_per_quantised_param"] is None else f"{row['bytes_per_quantised_param']:.3f}"
        print(f"{name:<15}{row['bytes_per_param']:>9.3f}{quant:>16}{row['step_ms']:>10.1f}{row['vs_torch_fused']:>9.2f}x{row['peak_step_mb']:>10.0f}")
    out = Path(args.out or f"bench/results/optim_states_{args.device}_{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": args.size, "device": args.device, "params": params, "threads": torch.get_num_threads(),
                               "repeats": args.repeats, "batch_size": args.batch_size, "seq_len": args.seq_len, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
