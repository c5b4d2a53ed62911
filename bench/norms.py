"""Forward + backward time of ebb's norms on one GPU: PyTorch eager, fla's fused kernels, and
PyTorch under torch.compile (what `train.compile` gives), same inputs, same run.

    python bench/norms.py [--tokens 8192] [--repeats 20]

Shapes are those of bench/gpu_throughput.py's models (bf16 activations, fp32 weights): the block
RMSNorm over d_model 2048, GDN's gated output norm per value head (6 x 512) and Mamba2's
gate-first group norm (d_inner 4096, one group). Prints each form's time and the ratios to eager;
writes bench/results/norms.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.layers.norms import GatedRMSNorm, RMSNorm  # noqa: E402

CASES = {  # name: (module factory, activation shape after the token dim, gated)
    "rmsnorm d2048": (lambda: RMSNorm(2048), (2048,), False),
    "gated per head 6x512": (lambda: GatedRMSNorm(512), (6, 512), True),
    "gate-first group 4096": (lambda: GatedRMSNorm(4096, 4096, gate_first=True), (4096,), True),
}


def fwd_bwd_ms(fn, x: torch.Tensor, z: torch.Tensor, repeats: int) -> float:
    x, z = x.detach().requires_grad_(), z.detach().requires_grad_()
    for _ in range(3):
        fn(x, z).sum().backward()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn(x, z).sum().backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/norms.py needs a CUDA GPU")
    rows = []
    for name, (make, shape, gated) in CASES.items():
        module = make().cuda()
        call = module if gated else (lambda x, z, m=module: m(x))
        x = torch.randn(args.tokens, *shape, device="cuda", dtype=torch.bfloat16)
        z = torch.randn_like(x)
        times = {}
        os.environ["EBB_FUSED_LAYERS"] = "0"
        times["eager"] = fwd_bwd_ms(call, x, z, args.repeats)
        times["compiled"] = fwd_bwd_ms(torch.compile(call), x, z, args.repeats)
        os.environ["EBB_FUSED_LAYERS"] = "1"
        times["fla"] = fwd_bwd_ms(call, x, z, args.repeats)
        rows.append({"norm": name, **{f"{k}_ms": v for k, v in times.items()}})
        print(f"{name:<24} eager {times['eager']:.3f} ms | fla {times['fla']:.3f} ms ({times['eager'] / times['fla']:.2f}x) | "
              f"compiled {times['compiled']:.3f} ms ({times['eager'] / times['compiled']:.2f}x)", flush=True)
    out = ROOT / "bench" / "results" / "norms.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rows": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
