"""Training throughput on one GPU: ebb's stacks against fla's own GatedDeltaNetForCausalLM.

    python bench/gpu_throughput.py [--triton-cache DIR] [--batch 4] [--steps 10] [--warmup 3] [--only ebb_G,fla_gdn]
    python bench/gpu_throughput.py --tiny        # CPU, toy sizes: the same comparison, so it cannot rot

One process, one GPU; bf16 autocast, fused AdamW, random tokens, vocab 32k, T = 2048. Models:
- `fla_gdn`: fla's GatedDeltaNetForCausalLM, hidden 2048, 21 layers, 6 heads of 256, expand_v 2
  (what flame pretrains): the peer; skipped with a line when fla cannot run here. It gets the
  batch as ebb does, B rows packed as documents of one sequence (cu_seqlens: flame's varlen mode);
- `ebb_G` / `ebb_G_compiled`: ebb's `G` stack of the same shape (SwiGLU 5632 as fla's, untied),
  eager and with `train.compile`;
- `ebb_hybrid`: `GGG*` repeated to 21 blocks (attention 16 heads of 128);
- `ebb_mamba2`: 21 Mamba2 blocks of the same width.
ebb's models run `train_step` as `pretrain.train` does (`train.loss=auto`: fused on CUDA where
liger-kernel or fla is installed, else chunked; fla or PyTorch per op as the header line says).

Each model warms up untimed for `--warmup` steps (Triton autotuning, compilation), then trains
`--steps` timed steps. On a fresh machine Triton's autotuning takes minutes; ebb's G stack runs
the chunked recurrence's kernels at fla's model's keys (tests/models/test_fla_ops.py), so the two
pay it once.
Reported: tokens/s, MFU by ebb's per-mixer FLOP count (3x forward) and by 6N (N = parameters
without the embedding), peak memory. With `--triton-cache DIR` Triton's
autotune/compile cache lives in DIR (TRITON_CACHE_DIR), so a second run skips autotuning. The tuned
configs of fla's kernels for this GPU apply before the first model, fla's included, as at a run's
start-up (EBB_FLA_CONFIGS; models/ops/fla_configs.py); with EBB_FLA_CONFIGS_CAPTURE=DIR what each
model's autotuning chose is captured into DIR after it. Writes bench/results/gpu_throughput[_tiny].json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = {"d_model": 2048, "layers": 21, "heads": 6, "head_dim": 256, "mlp": 5632, "attn_heads": 16, "vocab": 32000, "seq_len": 2048}
TINY = {"d_model": 64, "layers": 4, "heads": 2, "head_dim": 32, "mlp": 192, "attn_heads": 2, "vocab": 256, "seq_len": 64}
MODELS = ("fla_gdn", "ebb_G", "ebb_G_compiled", "ebb_hybrid", "ebb_mamba2")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, toy sizes (what CI runs)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; tiny 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    p.add_argument("--triton-cache", default=None, help="TRITON_CACHE_DIR: keep autotuning between runs")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def ebb_config(name: str, s: dict, tiny: bool):
    from pretrain.config import build_config

    layers = s["layers"]
    pattern = {"ebb_G": "G" * layers, "ebb_G_compiled": "G" * layers, "ebb_mamba2": "M" * layers,
               "ebb_hybrid": ("GGG*" * layers)[:layers]}[name]
    mixers = {
        "gated_deltanet": {"num_heads": s["heads"], "head_dim": s["head_dim"], "expand_v": 2.0},
        "attention": {"num_heads": s["attn_heads"]},
        "mamba2": {"head_dim": 64 if not tiny else 16, "d_state": 128 if not tiny else 16, "chunk_size": 64 if not tiny else 16},
    }
    tree = {
        "model": {"pattern": pattern, "d_model": s["d_model"], "vocab_size": s["vocab"], "mlp_hidden": s["mlp"],
                  "tie_embeddings": False, "norm_eps": 1e-6, "mixers": mixers},
        "train": {"compile": name.endswith("_compiled"), "loss": "auto", "seq_len": s["seq_len"],
                  "device": "cpu" if tiny else "cuda", "dtype": "float32" if tiny else "bfloat16"},
        "optim": {"fused": None},
    }
    return build_config(tree)


def build_ebb(name: str, s: dict, batch: int, tiny: bool, device) -> tuple[Callable, dict]:
    """ebb's model `name` of shape `s`, built, planned and parallelized as `pretrain.train` does:
    its training step (random tokens, `batch` rows packed as documents) and its sizes."""
    import torch

    from models.model import HybridLM
    from models.ops import plan_model
    from optim.adamw import build_optimizer
    from pretrain.data.packing import Batch
    from pretrain.parallelize import Parallel, fast_path_header, parallelize
    from pretrain.runtime import Runtime
    from pretrain.step import train_step

    cfg = ebb_config(name, s, tiny)
    dtype = torch.float32 if tiny else torch.bfloat16
    runtime = Runtime(device, dtype)
    torch.manual_seed(0)
    model = HybridLM(cfg.model).to(device)
    sizes = {"n": model.num_params(), "n_embed": model.embed.weight.numel(), "flops_per_token": 3 * model.flops_per_token(s["seq_len"])}
    print(f"  {name}: {sizes['n'] / 1e6:.1f}M params", flush=True)
    say(plan_model(model, device, dtype))
    par = Parallel({"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1})
    parallelize(par, model, cfg, runtime)
    say(fast_path_header(par, cfg))
    optimizer = build_optimizer(model, cfg.optim)
    T = s["seq_len"]

    def batches():
        while True:
            ids = torch.randint(0, s["vocab"], (batch, T + 1), device=device)
            yield Batch(ids[:, :-1], ids[:, 1:], torch.arange(0, batch * T + 1, T, dtype=torch.int32, device=device))

    data = batches()

    def step():
        return train_step(par, optimizer, data, 1, 1.0, runtime).loss

    return step, sizes


def say(lines: str | None) -> None:
    """Header lines, indented under the model's."""
    if lines:
        print("\n".join("  " + line for line in lines.splitlines()), flush=True)


def run_ebb(name: str, s: dict, args, device) -> dict:
    step, sizes = build_ebb(name, s, args.batch, args.tiny, device)
    return timed(name, step, args, device, args.batch * s["seq_len"], sizes["n"], sizes["n_embed"], sizes["flops_per_token"])


def fla_config(s: dict):
    """fla's GatedDeltaNetConfig of the shape `s`, as flame pretrains it: ebb's G stack, layer for layer."""
    from fla.models import GatedDeltaNetConfig

    return GatedDeltaNetConfig(
        hidden_size=s["d_model"], num_hidden_layers=s["layers"], num_heads=s["heads"], head_dim=s["head_dim"], expand_v=2.0,
        vocab_size=s["vocab"], intermediate_size=s["mlp"], tie_word_embeddings=False, use_cache=False,
        fuse_cross_entropy=True, fuse_linear_cross_entropy=False,  # flame's configs' loss (fla's linear one measured slower)
    )


def run_fla(s: dict, args, device) -> dict | str:
    """fla's GatedDeltaNetForCausalLM, or why it cannot run here (a string)."""
    import torch

    if device.type != "cuda":
        return "fla's Triton kernels need CUDA"
    try:
        from fla.models import GatedDeltaNetForCausalLM
    except Exception as exc:  # not installed, or no Triton
        return f"fla does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    from models.ops import dispatch

    platform = dispatch.platform_of(device)
    if dispatch.decide("chunk_gated_delta_rule", platform, torch.bfloat16, s["head_dim"]).lift_640:
        dispatch.fla_640_guard_lifted(True)  # the same key tile as ebb's G stack: fla's model would raise in backward otherwise
        print(f"  fla_gdn: fla's #640 guard lifted (Triton {platform.triton}, key dim {s['head_dim']})", flush=True)
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(fla_config(s)).to(device)
    n = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    print(f"  fla_gdn: {n / 1e6:.1f}M params", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    B, T = args.batch, s["seq_len"]

    documents = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)

    def step():  # B rows of T packed as one sequence of documents, as ebb's Batch (fla's varlen path)
        ids = torch.randint(0, s["vocab"], (1, B * T), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, cu_seqlens=documents).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # MFU by ebb's count of the same shape (fla's model is ebb's G stack, layer for layer)
    from models.model import HybridLM

    with torch.device("meta"):
        flops = 3 * HybridLM(ebb_config("ebb_G", s, False).model).flops_per_token(T)
    return timed("fla_gdn", step, args, device, B * T, n, n_embed, flops)


def timed(name, step, args, device, tokens_per_step, n, n_embed, flops_per_token) -> dict:
    import torch

    from pretrain.peak_flops import peak_flops

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    began = time.perf_counter()
    for i in range(args.warmup):
        step()
        sync()
        print(f"  {name}: warm-up step {i + 1}/{args.warmup} done at {time.perf_counter() - began:.1f} s", flush=True)
    warmup_s = time.perf_counter() - began
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    sync()
    seconds = time.perf_counter() - began
    tokens_per_s = tokens_per_step * args.steps / seconds
    peak = peak_flops(device)
    n_body = n - n_embed
    return {
        "model": name, "params": n, "params_no_embedding": n_body, "tokens_per_s": tokens_per_s,
        "mfu_ebb_flops": tokens_per_s * flops_per_token / peak if peak else None,
        "mfu_6n": tokens_per_s * 6 * n_body / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "warmup_s": warmup_s, "loss": float(losses[-1]),
    }


def table(rows: list[dict], skipped: dict[str, str]) -> str:
    head = f"{'model':<16} {'params':>9} {'tokens/s':>11} {'MFU(ebb)':>9} {'MFU(6N)':>8} {'peak GiB':>9} {'warmup s':>9} {'loss':>7}"
    lines = [head]
    for r in rows:
        pct = lambda x: f"{100 * x:.1f}%" if x is not None else "-"  # noqa: E731
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(f"{r['model']:<16} {r['params'] / 1e6:>8.1f}M {r['tokens_per_s']:>11.0f} {pct(r['mfu_ebb_flops']):>9} "
                     f"{pct(r['mfu_6n']):>8} {mem:>9} {r['warmup_s']:>9.1f} {r['loss']:>7.3f}")
    lines += [f"{name:<16} skipped: {why}" for name, why in skipped.items()]
    by = {r["model"]: r for r in rows}
    if "fla_gdn" in by and "ebb_G" in by:
        best = max((by[k]["tokens_per_s"] for k in ("ebb_G", "ebb_G_compiled") if k in by))
        lines.append(f"ebb G / fla: {best / by['fla_gdn']['tokens_per_s']:.2f}x tokens/s (goal >= 1.1x); "
                     f"params {by['ebb_G']['params'] / by['fla_gdn']['params']:.4f}x fla's (goal within 1%)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.triton_cache:  # before Triton is imported anywhere
        os.environ["TRITON_CACHE_DIR"] = str(Path(args.triton_cache).resolve())
    args.batch = args.batch or (2 if args.tiny else 4)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    import torch

    s = TINY if args.tiny else FULL
    if args.tiny:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, torch.get_num_threads()))
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu_throughput.py needs a CUDA GPU (use --tiny on CPU)")
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    names = args.only.split(",") if args.only else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)} (one of {', '.join(MODELS)})")
    from models.ops import fla_configs

    print(f"gpu_throughput: {'tiny, ' if args.tiny else ''}device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, torch {torch.__version__}, "
          f"batch {args.batch} x T {s['seq_len']}, vocab {s['vocab']}, warmup {args.warmup}, steps {args.steps}"
          f"{', TRITON_CACHE_DIR ' + os.environ['TRITON_CACHE_DIR'] if os.environ.get('TRITON_CACHE_DIR') else ''}", flush=True)
    configs_line = fla_configs.apply_for(device)  # before fla's model too, which ebb does not plan
    say(configs_line)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu_throughput{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device), "tiny": args.tiny,
              "batch": args.batch, "seq_len": s["seq_len"], "shape": s, "kernel_configs": configs_line, "rows": [], "skipped": {}}
    for name in names:
        result = run_model(name, s, args, device)
        if isinstance(result, str):
            report["skipped"][name] = result
            print(f"  {name}: skipped ({result})", flush=True)
        else:
            report["rows"].append(result)
            print("  " + table([result], {}).splitlines()[1], flush=True)
        out.write_text(json.dumps(report, indent=1) + "\n")  # after each model: a run cut short keeps what it measured
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            say(fla_configs.capture_from_env())  # and what its autotuning chose
    print(table(report["rows"], report["skipped"]))
    return report


def run_model(name: str, s: dict, args, device) -> dict | str:
    """One model's row, or why it has none: a model that fails on this platform does not stop the others."""
    try:
        return run_fla(s, args, device) if name == "fla_gdn" else run_ebb(name, s, args, device)
    except Exception as exc:
        if args.tiny:
            raise
        import traceback

        traceback.print_exc()
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


if __name__ == "__main__":
    main()
