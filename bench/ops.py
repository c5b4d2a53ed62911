"""Forward + backward time of each chunked op vs its step recurrence, same inputs, same run.

    python bench/ops.py [--seq-len 2048] [--threads N] [--repeats 5] [--device cuda]

Shape B=1, H=4, K=V=64, float32, chunk 64. Each time is the median of --repeats runs after a
warm-up, the chunked and recurrent runs alternating. The issue asks for a speedup of at least 20x.
"chunked" is ebb's pure-PyTorch chunked form on every device; on CUDA with fla installed the
fla Triton kernel of the same name is timed as a third form.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import models.ops as ops
from models.ops import delta_rule, dispatch, gated_delta_rule, rwkv7, simple_gla

SHAPE = dict(batch=1, heads=4, head_k_dim=64, head_v_dim=64, chunk_size=64)
REQUIRED_SPEEDUP = 20.0
OPS = {  # (ebb's torch chunked form, the dispatching op (fla on CUDA), recurrent, the inputs each takes)
    "simple_gla": (simple_gla.chunk_simple_gla, ops.chunk_simple_gla, ops.recurrent_simple_gla, ("q", "k", "v", "g")),
    "delta_rule": (delta_rule.chunk_delta_rule, ops.chunk_delta_rule, ops.recurrent_delta_rule, ("q", "k", "v", "beta")),
    "gated_delta_rule": (
        gated_delta_rule.chunk_gated_delta_rule, ops.chunk_gated_delta_rule, ops.recurrent_gated_delta_rule,
        ("q", "k", "v", "g", "beta"),
    ),
    "rwkv7": (rwkv7.chunk_rwkv7, ops.chunk_rwkv7, ops.recurrent_rwkv7, ("r", "w", "k", "v", "a", "b")),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def has_fla() -> bool:
    try:
        import fla  # noqa: F401
    except ImportError:
        return False
    return True


def make_inputs(seq_len: int) -> dict[str, torch.Tensor]:
    """Every op's inputs; RWKV-7's as its mixer makes them: log w in (-e^-0.5, 0),
    a = -kappa, b = kappa * (learning rate) for unit keys kappa."""
    B, H, K, V = SHAPE["batch"], SHAPE["heads"], SHAPE["head_k_dim"], SHAPE["head_v_dim"]
    inputs = {
        "q": torch.randn(B, seq_len, H, K),
        "k": F.normalize(torch.randn(B, seq_len, H, K), dim=-1),
        "v": torch.randn(B, seq_len, H, V),
        "g": F.logsigmoid(torch.randn(B, seq_len, H) + 3),
        "beta": torch.rand(B, seq_len, H),
    }
    kappa = F.normalize(torch.randn(B, seq_len, H, K), dim=-1)
    return {
        **inputs,
        "r": inputs["q"],
        "w": -0.6065 * torch.sigmoid(torch.randn(B, seq_len, H, K)),
        "a": -kappa,
        "b": kappa * torch.rand(B, seq_len, H, K),
    }


def forward_backward(
    fn: Callable, inputs: dict[str, torch.Tensor], grad_out: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """Seconds for one forward + backward, and the output."""
    leaves = {name: x.detach().requires_grad_() for name, x in inputs.items()}
    synchronize(grad_out.device)
    start = time.perf_counter()
    o, _ = fn(**leaves)
    (o * grad_out).sum().backward()
    synchronize(grad_out.device)
    return time.perf_counter() - start, o.detach()


def bench_op(name: str, seq_len: int, repeats: int, device: torch.device) -> dict:
    chunked, dispatching, recurrent, names = OPS[name]
    torch.manual_seed(0)
    all_inputs = {n: x.to(device) for n, x in make_inputs(seq_len).items()}
    inputs = {n: all_inputs[n] for n in names}
    grad_out = torch.randn_like(all_inputs["v"])
    forms: dict[str, Callable] = {"chunked": functools.partial(chunked, chunk_size=SHAPE["chunk_size"]), "recurrent": recurrent}
    if device.type == "cuda" and has_fla():
        decided = ops.checked_decision(dispatch.OpCall.of("?", dispatching.__name__, inputs), device)
        if decided.backend == "fla":
            forms["fla"] = functools.partial(dispatching, chunk_size=SHAPE["chunk_size"])
        else:
            print(f"  {name}: no fla row: {decided.reason}", flush=True)

    runs: dict[str, list[tuple[float, torch.Tensor]]] = {form: [] for form in forms}
    for fn in forms.values():
        forward_backward(fn, inputs, grad_out)  # warm-up
    for _ in range(repeats):
        for form, fn in forms.items():
            runs[form].append(forward_backward(fn, inputs, grad_out))
    ms = {form: 1e3 * statistics.median(t for t, _ in times) for form, times in runs.items()}
    o_ref = runs["recurrent"][-1][1]
    row = {
        "chunked_ms": ms["chunked"],
        "recurrent_ms": ms["recurrent"],
        "speedup": ms["recurrent"] / ms["chunked"],
        "max_abs_diff": (runs["chunked"][-1][1] - o_ref).abs().max().item(),
    }
    if "fla" in ms:
        row |= {"fla_ms": ms["fla"], "fla_speedup": ms["recurrent"] / ms["fla"],
                "fla_max_abs_diff": (runs["fla"][-1][1] - o_ref).abs().max().item()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per op and form (after one warm-up)")
    parser.add_argument("--out", default="bench/results/ops.json")
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = {name: bench_op(name, args.seq_len, args.repeats, device) for name in args.ops}

    print(f"ops fwd+bwd {SHAPE} float32 T={args.seq_len} device={device} threads={torch.get_num_threads()}")
    print(f"{'op':<18}{'chunked ms':>12}{'recurrent ms':>14}{'speedup':>10}{'max |o diff|':>14}")
    for name, row in rows.items():
        flag = "" if row["speedup"] >= REQUIRED_SPEEDUP else f"  below {REQUIRED_SPEEDUP:.0f}x"
        print(
            f"{name:<18}{row['chunked_ms']:>12.1f}{row['recurrent_ms']:>14.1f}"
            f"{row['speedup']:>9.1f}x{row['max_abs_diff']:>14.1e}{flag}"
        )
        if "fla_ms" in row:
            print(f"{'  fla kernel':<18}{row['fla_ms']:>12.1f}{'':>14}{row['fla_speedup']:>9.1f}x{row['fla_max_abs_diff']:>14.1e}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"shape": SHAPE, "dtype": "float32", "seq_len": args.seq_len, "device": str(device), "threads": torch.get_num_threads(),
              "repeats": args.repeats, "required_speedup": REQUIRED_SPEEDUP, "ops": rows}
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
