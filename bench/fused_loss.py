"""The fused linear cross-entropies on one GPU: liger-kernel's and fla's against ebb's chunked one
(pure PyTorch), forward + backward time and peak memory, same inputs, same run; which one
`train.loss: fused` should prefer (`pretrain.linear_ce.FUSED_KERNELS`' order).

    python bench/fused_loss.py [--tokens 16384] [--hidden 2048] [--vocab 32000,131072] [--repeats 10]

bf16 autocast, float32 weight (the head's), random hidden states and labels. Prints each kernel's
time and peak memory and their ratios to `chunked`; writes bench/results/fused_loss.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.linear_ce import FUSED_KERNELS, chunked_linear_cross_entropy, fused_kernel, fused_linear_cross_entropy  # noqa: E402


def measure(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(ms per forward + backward, peak GiB above the inputs)."""
    def once():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(h, w, labels)
        loss.backward()

    once()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        once()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats, (torch.cuda.max_memory_allocated() - base) / 2**30


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", default="32000,131072")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/fused_loss.py needs a CUDA GPU")
    kernels = {"chunked": chunked_linear_cross_entropy}
    for name in FUSED_KERNELS:
        if fused_kernel(name) is not None:
            kernels[name] = lambda h, w, y, name=name: fused_linear_cross_entropy(h, w, y, name)
        else:
            print(f"{name}: not installed, skipped", flush=True)
    rows = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(args.tokens, args.hidden, device="cuda", generator=g)
        weight = torch.randn(vocab, args.hidden, device="cuda", generator=g) * args.hidden**-0.5
        labels = torch.randint(0, vocab, (args.tokens,), device="cuda", generator=g)
        times = {name: measure(fn, hidden, weight, labels, args.repeats) for name, fn in kernels.items()}
        ms0, gib0 = times["chunked"]
        for name, (ms, gib) in times.items():
            rows.append({"vocab": vocab, "kernel": name, "ms": ms, "peak_gib": gib})
            print(f"vocab {vocab:>7} {name:<13} {ms:8.2f} ms ({ms0 / ms:.2f}x chunked's speed)  peak {gib:6.2f} GiB ({gib / gib0:.2f}x)", flush=True)
        del hidden, weight
    out = ROOT / "bench" / "results" / "fused_loss.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "hidden": args.hidden, "rows": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
