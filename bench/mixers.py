"""Forward + backward tokens/s of the MoM and SSE mixers: each against its own step-recurrence
form (the same mixer with the gated delta rule computed token by token) and against a Gated
DeltaNet mixer of the same width, same run.

    python bench/mixers.py [--seq-len 2048] [--threads N] [--repeats 3] [--device cuda]

B=1, d_model 256, every mixer 4 heads of d_k = d_v = 64, chunk 64, float32; MoM 4 memories top-2
with the shared memory, SSE 4 partitions top-1 (varlen and mask). Each time is the median of
--repeats runs after a warm-up, the forms alternating. The issue asks the chunked form to be at
least 20x faster than the step-recurrence form. On CUDA the chunked form is what training runs:
fla's kernel when fla is installed, ebb's PyTorch form otherwise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import models.ops as ops
from models.config import ModelConfig
from models.model import build_mixer
from models.ops import dispatch, recurrent_gated_delta_rule

D_MODEL = 256
HEADS = {"num_heads": 4, "head_dim": 64, "expand_v": 1.0, "chunk_size": 64}
MIXERS = {  # name: (pattern character, config section, options)
    "gated_deltanet": ("G", "gated_deltanet", {}),
    "mom": ("O", "mom", {"num_memories": 4, "topk": 2, "shared_memory": True}),
    "sse_varlen": ("S", "sse", {"num_partitions": 4, "topk": 1, "impl": "varlen"}),
    "sse_mask": ("S", "sse", {"num_partitions": 4, "topk": 1, "impl": "mask"}),
}
REQUIRED_SPEEDUP = 20.0


def step_recurrence(*args, chunk_size: int, **kwargs):
    """The gated delta rule token by token, called like the chunked op."""
    return recurrent_gated_delta_rule(*args, **kwargs)


def make_mixer(name: str, recurrent: bool) -> nn.Module:
    kind, section, options = MIXERS[name]
    cfg = ModelConfig(pattern=kind, d_model=D_MODEL, mixers={section: HEADS | options})
    torch.manual_seed(0)
    mixer = build_mixer(kind, cfg, layer_idx=0)
    if recurrent:
        mixer.op = step_recurrence
    return mixer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(mixer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> float:
    mixer.zero_grad(set_to_none=True)
    synchronize(x.device)
    start = time.perf_counter()
    (mixer(x, carry={}) * grad_out).sum().backward()
    synchronize(x.device)
    return time.perf_counter() - start


def plan_mixer(name: str, mixer: nn.Module, x: torch.Tensor) -> None:
    """On CUDA, decide (and check, under fla #640) what runs the mixer's ops, as a run's start-up does."""
    if x.device.type != "cuda":
        return
    for call, decided in dispatch.planned_calls(mixer, lambda: mixer(x[:, :64], carry={}), x.device, ops.TORCH_OPS):
        print(f"  {name}: {decided.backend} {call.op} ({decided.reason})", flush=True)


def bench_mixer(name: str, x: torch.Tensor, grad_out: torch.Tensor, repeats: int) -> dict:
    forms = {form: make_mixer(name, recurrent=form == "recurrent").to(x.device) for form in ("chunked", "recurrent")}
    plan_mixer(name, forms["chunked"], x)
    times: dict[str, list[float]] = {form: [] for form in forms}
    for mixer in forms.values():
        forward_backward(mixer, x, grad_out)  # warm-up
    for _ in range(repeats):
        for form, mixer in forms.items():
            times[form].append(forward_backward(mixer, x, grad_out))
    chunked, recurrent = (statistics.median(times[form]) for form in forms)
    with torch.no_grad():
        diff = (forms["chunked"](x) - forms["recurrent"](x)).abs().max().item()
    return {
        "chunked_ms": 1e3 * chunked,
        "recurrent_ms": 1e3 * recurrent,
        "tokens_per_s": x.shape[1] / chunked,
        "speedup": recurrent / chunked,
        "max_abs_diff": diff,
        "flops_per_token": forms["chunked"].flops_per_token(x.shape[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mixer and form (after one warm-up)")
    parser.add_argument("--out", default="bench/results/mixers.json")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, args.seq_len, D_MODEL, device=args.device)
    grad_out = torch.randn_like(x)

    rows = {name: bench_mixer(name, x, grad_out, args.repeats) for name in MIXERS}
    gdn = rows["gated_deltanet"]
    for row in rows.values():
        row["time_vs_gdn"] = row["chunked_ms"] / gdn["chunked_ms"]
        row["flops_vs_gdn"] = row["flops_per_token"] / gdn["flops_per_token"]

    print(f"mixers fwd+bwd B=1 T={args.seq_len} d_model={D_MODEL} {HEADS} float32 device={args.device} threads={torch.get_num_threads()}")
    print(f"{'mixer':<16}{'tokens/s':>10}{'chunked ms':>12}{'recurrent ms':>14}{'speedup':>10}"
          f"{'time/GDN':>10}{'FLOPs/GDN':>11}{'max |o diff|':>14}")
    for name, row in rows.items():
        flag = "" if row["speedup"] >= REQUIRED_SPEEDUP else f"  below {REQUIRED_SPEEDUP:.0f}x"
        print(f"{name:<16}{row['tokens_per_s']:>10.0f}{row['chunked_ms']:>12.1f}{row['recurrent_ms']:>14.1f}"
              f"{row['speedup']:>9.1f}x{row['time_vs_gdn']:>9.2f}x{row['flops_vs_gdn']:>10.2f}x"
              f"{row['max_abs_diff']:>14.1e}{flag}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"d_model": D_MODEL, "heads": HEADS, "mixers": {n: m[2] for n, m in MIXERS.items()}, "dtype": "float32",
              "seq_len": args.seq_len, "device": args.device, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "required_speedup": REQUIRED_SPEEDUP, "results": rows}
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
