"""Score a checkpoint on downstream tasks with lm-evaluation-harness, in-process (no export).

    python -m pretrain.evaluate --checkpoint RUN_DIR_OR_STEP --tasks hellaswag,arc_easy \
        [--include-path DIR] [--limit N] [--num-fewshot N] [--batch-size 16] [--max-length N] \
        [--device auto] [--dtype auto] [--output results.json]

The checkpoint is verified against its manifest and loaded as `pretrain.generate` loads it; the
model runs as an lm-eval `LM` (`pretrain.evaluation.lm.EbbLM`) with the run's tokenizer. The
console shows lm-eval's table; `--output` writes lm-eval's results (`results[task]["acc,none"]`
and the rest) as JSON. Bad input (no or a damaged checkpoint, an unknown task, a task whose data
cannot be loaded, lm-eval missing) is one `error:` line and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from checkpoint import CheckpointError
from common.errors import first_line
from pretrain.config import ConfigError
from pretrain.data import DataError
from pretrain.evaluation.tasks import EvaluationError, check_tasks, evaluate_tasks, require_lm_eval, task_manager
from pretrain.generate import load_trained

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run dir, its checkpoints dir, or one step-* checkpoint")
    parser.add_argument("--tasks", required=True, help="lm-eval task, group or tag names, comma-separated")
    parser.add_argument("--include-path", type=Path, help="a folder of task YAMLs beside lm-eval's own")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction of each task when below 1)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass, each packed with requests (default 16)")
    parser.add_argument("--max-length", type=int, help="context in tokens (default: the run's train.seq_len)")
    parser.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval's bootstrap for standard errors; 0: none")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto: cuda when available")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 autocast on CUDA, float32 elsewhere")
    parser.add_argument("--output", type=Path, help="write lm-eval's results here as JSON")
    parser.add_argument("--log-samples", action="store_true", help="with --output: each request's inputs and responses too")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """The task names; one-line errors for values that cannot run."""
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise ConfigError("--tasks names no task")
    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 2) or (args.limit is not None and args.limit <= 0):
        raise ConfigError("--batch-size must be >= 1, --max-length >= 2 and --limit > 0")
    if args.output is not None and args.output.is_dir():
        raise ConfigError(f"--output {args.output} is a directory; give a file name")
    return names


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def evaluator(path: Path, device: torch.device, dtype: torch.dtype, batch_size: int, max_length: int | None) -> Any:
    """The checkpoint's model as an lm-eval `LM`: weights in float32 under bf16 autocast, or cast
    to float32 or float64."""
    from pretrain.evaluation.lm import EbbLM

    cfg, model, tokenizer = load_trained(path, device, dtype if dtype == torch.bfloat16 else torch.float32)
    if dtype == torch.bfloat16:
        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        model.to(dtype)
        autocast = contextlib.nullcontext
    return EbbLM(model, tokenizer, device, batch_size, max_length or cfg.train.seq_len, autocast)


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = check_args(args)
    require_lm_eval()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    manager = task_manager(args.include_path, names)
    check_tasks(names, manager)  # before the model is loaded: a missing task fails fast
    lm = evaluator(args.checkpoint, device, compute_dtype(args.dtype, device), args.batch_size, args.max_length)
    began = time.perf_counter()
    results = evaluate_tasks(lm, names, manager, args.limit, args.num_fewshot, args.bootstrap_iters, args.log_samples)
    results["ebb"] = {"checkpoint": str(args.checkpoint), "seconds": time.perf_counter() - began, "max_length": lm.max_length,
                      "batch_size": args.batch_size, "device": str(device), "dtype": str(compute_dtype(args.dtype, device)).removeprefix("torch.")}
    return results


def write_results(results: dict[str, Any], output: Path) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".tmp")
        partial.write_text(json.dumps(results, indent=2, default=str))
        partial.replace(output)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or first_line(exc)}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
        from lm_eval.utils import make_table

        print(make_table(results))
        if "groups" in results and results["groups"]:
            print(make_table(results, "groups"))
        if args.output is not None:
            write_results(results, args.output)
            print(f"wrote {args.output}")
    except (ConfigError, DataError, CheckpointError, EvaluationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ebb: SIGINT: stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
