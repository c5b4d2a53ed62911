"""Conversion time and peak resident memory of `python -m checkpoint.convert` on a large checkpoint.

A hybrid ("MTG*" repeated, d_model 2048, vocabulary 50304, untied) of about --params parameters
gets synthetic weights (its own init) and is saved through ebb's checkpointer (sync mode, fp32
weights, no optimizer state); then each conversion runs in a fresh process, whose peak RSS comes
from os.wait4:
- to-hf --format remote --dtype bf16 and --dtype fp32;
- from-hf of the fp32 export (back to an fp32 step-0 checkpoint).
Memory is reported as a ratio to the weights' size, raw and above a process that only imports
what the converter imports (Python, torch, transformers: the baseline), and against the largest
tensor (conversion streams tensor by tensor, so that is its scale).

    python bench/convert_hf.py [--params 1e9] [--dir /tmp/ebb-convert-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from checkpoint import build_checkpointer  # noqa: E402
from checkpoint.config import CheckpointConfig  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.model import HybridLM  # noqa: E402

D_MODEL, VOCAB = 2048, 50304
MIXERS = {
    "attention": {"num_heads": 16, "num_kv_heads": 8},
    "mamba2": {"d_state": 128, "head_dim": 64, "n_groups": 8},
    "deltanet": {"num_heads": 16},
    "gated_deltanet": {"num_heads": 8, "head_dim": 128},
}
IMPORTS = "import torch, transformers, tokenizers, checkpoint.convert, models.hf.native, models.hf.tokenizer, models.model"


def config(blocks: int) -> ModelConfig:
    pattern = ("MTG*" * ((blocks + 3) // 4))[:blocks]
    return ModelConfig(pattern=pattern, d_model=D_MODEL, vocab_size=VOCAB, tie_embeddings=False, mixers=MIXERS)


def sized_config(params: float) -> ModelConfig:
    """The block count whose model is closest to `params` parameters."""
    def count(blocks: int) -> int:
        with torch.device("meta"):
            return HybridLM(config(blocks)).num_params()

    return config(min(range(1, 64), key=lambda b: abs(count(b) - params)))


class _Stub:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def save_synthetic(cfg: ModelConfig, root: Path) -> tuple[int, int]:
    """Save through ebb's checkpointer; (weight bytes, largest tensor bytes)."""
    import yaml

    torch.manual_seed(0)
    model = HybridLM(cfg)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    text = yaml.safe_dump({"model": cfg.model_dump(mode="json")}, sort_keys=False)
    checkpoints = build_checkpointer(root, CheckpointConfig(mode="sync"), {"config.yaml": text})
    checkpoints.save(1, model, torch.optim.SGD(model.parameters(), lr=0.1), _Stub(), _Stub(), final=True)
    checkpoints.finalize()
    return sum(sizes), max(sizes)


# The child reports its own high-water RSS (VmHWM) at exit: rusage's maxrss would include the
# bench process's memory, which a forked child holds until it execs.
PEAK = "import atexit, sys; atexit.register(lambda: print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)); "
MODULE = PEAK + "import runpy; sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"


def measured(args: list[str]) -> dict[str, float]:
    """Wall time and peak RSS (bytes) of one fresh process: `-m module args...` or `-c code`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = ["-c", MODULE, *args[1:]] if args[0] == "-m" else ["-c", PEAK + args[1]]
    began = time.perf_counter()
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    peak = int(result.stderr.rsplit("VmHWM", 1)[1].split()[0]) * 1024
    return {"seconds": seconds, "peak_rss": peak, "stdout": result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ebb-convert-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    cfg = sized_config(args.params)
    began = time.perf_counter()
    weight_bytes, largest = save_synthetic(cfg, args.dir / "run" / "checkpoints")
    print(f"saved {weight_bytes / 4 / 1e9:.3f}B params ({cfg.pattern!r}, {weight_bytes / 1e9:.2f} GB fp32, "
          f"largest tensor {largest / 1e6:.0f} MB) through ebb's checkpointer in {time.perf_counter() - began:.0f}s")
    convert = ["-m", "checkpoint.convert"]
    runs = {
        "baseline (imports only)": ["-c", IMPORTS],
        "to-hf remote bf16": [*convert, "to-hf", "--checkpoint", str(args.dir / "run"), "--output", str(args.dir / "hf_bf16"), "--dtype", "bf16"],
        "to-hf remote fp32": [*convert, "to-hf", "--checkpoint", str(args.dir / "run"), "--output", str(args.dir / "hf_fp32"), "--dtype", "fp32"],
        "from-hf (fp32)": [*convert, "from-hf", "--model", str(args.dir / "hf_fp32"), "--output", str(args.dir / "back")],
    }
    results = {name: measured(argv) for name, argv in runs.items()}
    baseline = results["baseline (imports only)"]["peak_rss"]
    print(f"\n{'':26} {'time s':>7} {'peak RSS GB':>12} {'/ weights':>10} {'above baseline / weights':>25} {'above baseline / largest tensor':>32}")
    for name, r in results.items():
        above = r["peak_rss"] - baseline
        r |= {"peak_rss_over_weights": r["peak_rss"] / weight_bytes, "above_baseline_over_weights": above / weight_bytes,
              "above_baseline_over_largest_tensor": above / largest}
        print(f"{name:26} {r['seconds']:7.1f} {r['peak_rss'] / 1e9:12.2f} {r['peak_rss_over_weights']:10.3f} "
              f"{r['above_baseline_over_weights']:25.3f} {r['above_baseline_over_largest_tensor']:32.2f}")
    out = REPO / "bench" / "results" / "convert_hf.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "params": weight_bytes // 4, "pattern": cfg.pattern, "d_model": D_MODEL, "vocab_size": VOCAB,
        "weight_bytes_fp32": weight_bytes, "largest_tensor_bytes": largest, "cpus": os.cpu_count(), "runs": results,
    }, indent=1) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
