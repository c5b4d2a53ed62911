"""Start-up on a fresh machine: seconds from process start to the end of the first optimizer step of
ebb's 1.3B Gated DeltaNet stack (bench/gpu_throughput.py's `ebb_G`, batch 4 x 2048), each in a
new process with an empty Triton cache, without and with ebb's tuned configs of fla's kernels.

    python bench/gpu_startup.py [--variants without,with] [--fla-configs DIR] [--cold-cache DIR]
    python bench/gpu_startup.py --tiny     # CPU, toy sizes: the same two processes, so it cannot rot

`without` runs with EBB_FLA_CONFIGS=off: Triton autotunes every kernel, as on a fresh machine
today. With EBB_FLA_CONFIGS_CAPTURE=DIR set, that process captures what its autotuning chose into
DIR after its step (so one call measures it and makes the set). `with` loads the sets of
`--fla-configs DIR` (default: those ebb ships) and captures nothing. Each process gets a new, empty
TRITON_CACHE_DIR (and Inductor cache): what a fresh machine has. `--cold-cache DIR` gives
`without` the empty or absent DIR instead of a temporary one, and keeps it, so that later runs
reuse its autotuning and compiled kernels. Reported per variant: seconds to the end of the first
step (the spawn of the process to its `cuda.synchronize()` after `optimizer.step()`), of which
building and planning the model (imports included), the header's kernel-config line, and how
many (kernel, key) pairs the step launched and how many of them the set served. Writes
bench/results/gpu_startup[_tiny].json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {"without": "off", "with": None}  # EBB_FLA_CONFIGS per variant (None: --fla-configs)
GOAL_S = 60.0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="without,with", help=f"comma-separated, in order: {','.join(VARIANTS)}")
    p.add_argument("--fla-configs", default="auto", help="EBB_FLA_CONFIGS of `with`: a directory of sets (default: the shipped ones)")
    p.add_argument("--cold-cache", default=None, help="`without`'s Triton cache: an empty or absent directory, kept afterwards")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; tiny 2)")
    p.add_argument("--timeout", type=float, default=None, help="seconds each process may take")
    p.add_argument("--tiny", action="store_true", help="CPU, toy sizes (what the test runs)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one variant's process, writing its result here
    return p.parse_args(argv)


def throughput_bench():
    spec = importlib.util.spec_from_file_location("gpu_throughput", ROOT / "bench" / "gpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(args) -> None:
    """One variant: build ebb_G, take one training step, and write when it ended (wall clock)."""
    import torch

    from models.ops import fla_configs

    bench = throughput_bench()
    device = torch.device("cpu" if args.tiny else "cuda")
    shape = bench.TINY if args.tiny else bench.FULL
    step, sizes = bench.build_ebb("ebb_G", shape, args.batch, args.tiny, device)
    built = time.time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    done = time.time()
    bench.say(fla_configs.capture_from_env())
    launched = {(fla_configs.kernel_of(t)[1], key) for t in fla_configs.autotuners() if len(t.configs) > 1 for key in t.cache}
    served = fla_configs.usage.served
    result = {"built_at": built, "done_at": done, "params": sizes["n"], "kernel_configs": fla_configs.apply_for(device),
              "kernel_keys": len(launched), "keys_from_set": len(served),
              "autotuned_despite_set": sorted({name for name, _ in launched - served}) if os.environ.get("EBB_FLA_CONFIGS") != "off" else []}
    Path(args.child).write_text(json.dumps(result) + "\n")


def triton_cache(name: str, args, scratch: Path) -> Path:
    """The variant's empty Triton cache: `--cold-cache` for `without` where given, else a new one."""
    if name == "without" and args.cold_cache:
        return Path(args.cold_cache).resolve()
    return scratch / f"{name}_triton"


def run_variant(name: str, args, scratch: Path) -> dict:
    """Spawn one variant's process; its row."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(triton_cache(name, args, scratch)), TORCHINDUCTOR_CACHE_DIR=str(scratch / f"{name}_inductor"),
               EBB_FLA_CONFIGS=VARIANTS[name] or args.fla_configs)
    if name == "with":
        env.pop("EBB_FLA_CONFIGS_CAPTURE", None)
    result = scratch / f"{name}.json"
    cmd = [sys.executable, __file__, "--child", str(result), "--batch", str(args.batch), *(["--tiny"] if args.tiny else [])]
    print(f"gpu_startup: {name} (EBB_FLA_CONFIGS={env['EBB_FLA_CONFIGS']}, TRITON_CACHE_DIR={env['TRITON_CACHE_DIR']})", flush=True)
    began = time.time()
    try:
        done = subprocess.run(cmd, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": name, "failed": f"over {args.timeout:.0f} s to the first step (stopped there)"}
    if done.returncode != 0 or not result.exists():
        return {"variant": name, "failed": f"exit status {done.returncode}"}
    r = json.loads(result.read_text())
    return {"variant": name, "to_first_step_s": r["done_at"] - began, "build_s": r["built_at"] - began, "first_step_s": r["done_at"] - r["built_at"],
            **{k: r[k] for k in ("params", "kernel_configs", "kernel_keys", "keys_from_set", "autotuned_despite_set")}}


def table(rows: list[dict]) -> str:
    lines = [f"{'variant':<8} {'to 1st step':>12} {'build+plan':>11} {'1st step':>9} {'kernel keys':>11} {'from set':>9}  kernel configs"]
    for r in rows:
        if "failed" in r:
            lines.append(f"{r['variant']:<8} failed: {r['failed']}")
            continue
        lines.append(f"{r['variant']:<8} {r['to_first_step_s']:>10.1f} s {r['build_s']:>9.1f} s {r['first_step_s']:>7.1f} s "
                     f"{r['kernel_keys']:>11} {r['keys_from_set']:>9}  {r['kernel_configs'] or '-'}")
        if r["autotuned_despite_set"]:
            lines.append(f"{'':<8} autotuned all the same: {', '.join(r['autotuned_despite_set'])}")
    by = {r["variant"]: r for r in rows if "failed" not in r}
    if {"with", "without"} <= by.keys():
        w, wo = by["with"]["to_first_step_s"], by["without"]["to_first_step_s"]
        lines.append(f"with / without: {w / wo:.2f}x ({wo - w:.0f} s saved); with: {w:.1f} s (goal <= {GOAL_S:.0f} s)")
    return "\n".join(lines)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 4)
    if args.child:
        child(args)
        return None
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        fail(f"unknown variant(s) {', '.join(unknown)} (one of {', '.join(VARIANTS)})")
    cold = Path(args.cold_cache) if args.cold_cache else None
    if "without" in names and cold is not None and cold.exists() and any(cold.iterdir()):
        fail(f"--cold-cache {cold} is not empty: a fresh machine's start-up needs an empty Triton cache")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench/gpu_startup.py needs a CUDA GPU (use --tiny on CPU)")
    device = "cpu" if args.tiny else torch.cuda.get_device_name()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu_startup{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": device, "torch": torch.__version__, "tiny": args.tiny, "batch": args.batch, "rows": []}
    scratch = Path(tempfile.mkdtemp(prefix="ebb-startup-"))
    try:
        for name in names:
            report["rows"].append(run_variant(name, args, scratch))
            out.write_text(json.dumps(report, indent=1) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"start-up of ebb_G ({'tiny' if args.tiny else '1.3B'}, batch {args.batch}), empty Triton cache, {device}:")
    print(table(report["rows"]))
    return report


if __name__ == "__main__":
    main()
