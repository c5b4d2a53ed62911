"""Optimizer offload on one GPU: ebb's interleaved offload against what users would pick instead.

    python bench/offload.py                      # one H100: a ~2.4B-parameter model, batch 8 x 2048
    python bench/offload.py --layers 20 --batch 6 --only none,interleaved
    python bench/offload.py --device cpu --d-model 512 --layers 8 --batch 2 --seq-len 256   # CPU: offload's overhead
    python bench/offload.py --tiny               # CPU, toy sizes: the same comparison, so it cannot rot

One process; a dense ebb model (`--pattern`, default softmax attention + SwiGLU blocks, which need
no Triton kernels), bf16 autocast on CUDA, random tokens. Its fp32 parameters and gradients stay on
the device (8 bytes/param); AdamW's fp32 moments take 8 more, which with the activations of the
default batch do not fit an 80 GB H100. Variants, each from a fresh model:
- `none`: ebb's AdamW, states on the device (torch's fused kernel); when the batch does not fit,
  it is halved until it does, and the row says so (compare tokens/s then);
- `host_all`: ebb's offload with every subgroup on the host (`gpu_every_k=0`): ZeRO-Offload's
  static all-host placement, with ebb's overlapped transfers;
- `torchao`: torchao's `CPUOffloadOptimizer` (per-parameter torch AdamW on the host, fused),
  which cannot clip gradients: its steps are not clipped (skipped with a line where torchao or CUDA
  is missing);
- `interleaved`: ebb's offload with k from the performance model (`--k` pins it).
ebb's variants run `pretrain.step.train_step` (clipping at 1.0), as `pretrain.train` does.
Reported: seconds per step (median of `--steps` after `--warmup`), tokens/s, peak device memory,
and each as a ratio to `interleaved`; and the host AdamW throughput of torch's fused CPU kernel
against DeepSpeed's CPU Adam (where DeepSpeed builds) on `--host-numel` elements, which decides
`host_optimizer: auto`. Writes bench/results/offload[_tiny|_cpu].json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("none", "host_all", "torchao", "interleaved")
TINY = dict(d_model=64, layers=2, mlp=192, heads=2, vocab=256, seq_len=64, batch=2, steps=2, warmup=1, subgroup_size=20_000, host_numel=1 << 16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, toy sizes (what the test runs)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu")
    p.add_argument("--pattern", default="*", help="block pattern, repeated to --layers blocks")
    p.add_argument("--d-model", type=int, default=2560)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--mlp", type=int, default=6912, help="SwiGLU hidden size")
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--subgroup-size", type=int, default=50_000_000)
    p.add_argument("--k", default="auto", help="interleaved's gpu_every_k: auto or an int")
    p.add_argument("--host-numel", type=int, default=1 << 24, help="elements of the host AdamW comparison")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
        args.device = "cpu"
    return args


def run_config(args: argparse.Namespace, offload: dict | None):
    from pretrain.config import build_config

    cuda = args.device == "cuda"
    tree = {
        "model": {"pattern": (args.pattern * args.layers)[: args.layers], "d_model": args.d_model, "vocab_size": args.vocab,
                  "mlp_hidden": args.mlp, "tie_embeddings": False, "mixers": {"attention": {"num_heads": args.heads}}},
        "train": {"loss": "auto", "seq_len": args.seq_len, "device": args.device, "dtype": "bfloat16" if cuda else "float32"},
        "optim": {"lr": 1e-4, "warmup_steps": 1, **({"offload": offload} if offload else {})},
    }
    return build_config(tree)


def build_model(cfg, device):
    import torch

    from models.model import HybridLM
    from models.ops import plan_model
    from pretrain.parallelize import Parallel, parallelize
    from pretrain.runtime import Runtime

    runtime = Runtime(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    model = HybridLM(cfg.model).to(device)
    plan_model(model, device, runtime.dtype)
    par = Parallel({"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1})
    parallelize(par, model, cfg, runtime)
    return model, par, runtime


def batches(args: argparse.Namespace, batch: int, device):
    import torch

    from pretrain.data.packing import Batch

    T = args.seq_len
    while True:
        ids = torch.randint(0, args.vocab, (batch, T + 1), device=device)
        yield Batch(ids[:, :-1], ids[:, 1:], torch.arange(0, batch * T + 1, T, dtype=torch.int32, device=device))


def make_step(name: str, args: argparse.Namespace, batch: int, device):
    """(the step function, its optimizer's header line or None) of variant `name`, or a string
    saying why it cannot run here."""
    import torch

    from optim.adamw import build_optimizer
    from pretrain.step import forward_loss, train_step

    offload = {"none": None, "torchao": None, "host_all": {"enabled": True, "gpu_every_k": 0},
               "interleaved": {"enabled": True, "gpu_every_k": args.k if args.k == "auto" else int(args.k)}}[name]
    if offload:
        offload["subgroup_size"] = args.subgroup_size
    cfg = run_config(args, offload)
    model, par, runtime = build_model(cfg, device)
    data = batches(args, batch, device)
    if name != "torchao":
        optimizer = build_optimizer(model, cfg.optim)
        return (lambda: train_step(par, optimizer, data, 1, 1.0, runtime).loss), getattr(optimizer, "header", None), model
    if device.type != "cuda":
        return "torchao's CPUOffloadOptimizer needs CUDA"
    try:
        from torchao.optim import CPUOffloadOptimizer
    except Exception as exc:  # not installed, or built for another torch
        return f"torchao does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    optimizer = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True)

    def step():
        loss, _ = forward_loss(model, next(data), runtime, par.head, par.logits_loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step, None, model


def timed(step, args: argparse.Namespace, device) -> tuple[list[float], float]:
    import torch

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - began)
    return times, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")


def run_variant(name: str, args: argparse.Namespace, device) -> dict | str:
    """The variant's row; `none` halves its batch until it fits (CUDA out of memory)."""
    import torch

    batch = args.batch
    while True:
        try:
            made = make_step(name, args, batch, device)
            if isinstance(made, str):
                return made
            step, header, model = made
            times, peak = timed(step, args, device)
            break
        except torch.OutOfMemoryError:
            made = step = model = None
            _free(device)
            if name != "none" or batch == 1:
                return f"out of device memory at batch {batch}"
            batch //= 2
            print(f"  {name}: out of memory, batch {batch} next", flush=True)
    seconds = statistics.median(times)
    row = {"variant": name, "batch": batch, "s_per_step": seconds, "tokens_per_s": batch * args.seq_len / seconds,
           "peak_gib": peak, "params": sum(p.numel() for p in model.parameters()), "header": header}
    del made, step, model
    _free(device)
    return row


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list[dict], skipped: dict[str, str], hosts: dict[str, float | str]) -> str:
    base = next((r for r in rows if r["variant"] == "interleaved"), None)
    lines = [f"{'variant':<12} {'batch':>5} {'s/step':>8} {'tokens/s':>10} {'peak GiB':>9} {'s/step / interleaved':>21} {'tokens/s / interleaved':>23}"]
    for r in rows:
        ratio_t = f"{r['s_per_step'] / base['s_per_step']:.2f}x" if base else "-"
        ratio_k = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        lines.append(f"{r['variant']:<12} {r['batch']:>5} {r['s_per_step']:>8.3f} {r['tokens_per_s']:>10.0f} {r['peak_gib']:>9.1f} {ratio_t:>21} {ratio_k:>23}")
    lines += [f"{name:<12} skipped: {why}" for name, why in skipped.items()]
    speeds = {n: r for n, r in hosts.items() if isinstance(r, float)}
    lines.append("host AdamW: " + ", ".join(f"{n} {r / 1e9:.3g} Gparam/s" if isinstance(r, float) else f"{n}: {r}" for n, r in hosts.items()))
    if "torch" in speeds and "deepspeed" in speeds:
        lines.append(f"host AdamW: torch fused / DeepSpeed CPU Adam = {speeds['torch'] / speeds['deepspeed']:.2f}x throughput")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    args.device = args.device or "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/offload.py needs a CUDA GPU (use --tiny or --device cpu on CPU)")
    device = torch.device(args.device)
    if device.type == "cpu" and args.tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)} (one of {', '.join(VARIANTS)})")
    print(f"offload: {'tiny, ' if args.tiny else ''}device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.layers} x {args.pattern!r} blocks of d_model {args.d_model}, batch {args.batch} x T {args.seq_len}, "
          f"subgroups of {args.subgroup_size}, warmup {args.warmup}, steps {args.steps}", flush=True)
    from optim.offload import host_throughputs

    hosts = host_throughputs(args.host_numel)
    rows, skipped = [], {}
    for name in names:
        result = run_variant(name, args, device)
        if isinstance(result, str):
            skipped[name] = result
            print(f"  {name}: skipped ({result})", flush=True)
            continue
        rows.append(result)
        print(f"  {name}: {result['params'] / 1e6:.1f}M params, batch {result['batch']}, {result['s_per_step']:.3f} s/step"
              + (f"\n  {result['header']}" if result["header"] else ""), flush=True)
    print(table(rows, skipped, hosts))
    suffix = "_tiny" if args.tiny else ("_cpu" if device.type == "cpu" else "")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"offload{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": str(device), "tiny": args.tiny, "args": vars(args), "rows": rows, "skipped": skipped, "host_adamw_elements_per_s": hosts}
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
