"""Pretrain a HybridLM from a config file.

    python -m pretrain.train --config configs/quickstart.yaml [--resume] [section.key=value ...]
    torchrun --nproc-per-node 4 -m pretrain.train --config ... parallel.tp=2   # see launch/torchrun.sh

Under torchrun every rank runs this loop on its part of the model (pretrain/parallelize.py); rank
0 alone prints, logs metrics and writes the run directory's files. `train` is `build_run` (all
that the loop needs, as a `Run`) then `train_loop`.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LRScheduler

from checkpoint import Checkpointer, CheckpointError, build_checkpointer, find_latest
from models.model import HybridLM
from models.ops import plan_model
from optim.adamw import build_optimizer
from optim.schedules import build_lr_schedule
from parallel.mesh import ParallelError
from pretrain.config import ConfigError, RunConfig, TrainConfig, dump_config, load_config
from pretrain.data import Batch, DataError, build_data
from pretrain.data.loader import PrefetchedBatches, TokenBatches, mixture_record
from pretrain.peak_flops import peak_flops
from pretrain.metrics import MetricsLogger, Throughput, peak_memory_mb
from pretrain.parallelize import Parallel, fast_path_header, parallelize, start
from pretrain.runtime import Runtime, set_up
from pretrain.step import StepResult, evaluate, train_step

USER_ERRORS = (ConfigError, DataError, CheckpointError, ParallelError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run config (YAML); defaults when omitted")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the checkpoint dir")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_intermixed_args(argv)


def tokens_per_step(t: TrainConfig, dp_size: int) -> int:
    """Tokens in one step's global batch: every data-parallel rank's batches."""
    return dp_size * t.batch_size * t.seq_len * t.grad_accum


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.train.run_dir) / "checkpoints"


def refuse_to_overwrite(root: Path) -> None:
    if latest := find_latest(root):
        raise CheckpointError(f"{root} already holds checkpoints (latest {latest.name}); pass --resume to continue, or use another train.run_dir")


def print_header(cfg: RunConfig, num_params: int, par: Parallel, runtime: Runtime, first: int, end: int, eval_skipped: bool) -> None:
    t = cfg.train
    layout = " x ".join(f"{dim} {size}" for dim, size in par.shape.items() if size > 1) or "one process"
    print(
        f"ebb: {num_params / 1e6:.2f}M params ({cfg.model.pattern!r}), {tokens_per_step(t, par.dp_size)} tokens/step, "
        f"steps {first + 1}..{end} of {t.steps}, {layout}, device {runtime.device} ({str(runtime.dtype).removeprefix('torch.')}), "
        f"threads {torch.get_num_threads()}, run dir {t.run_dir}",
        flush=True,
    )
    if eval_skipped:
        print("ebb: no evaluation under pipeline parallelism (the schedules have no eval step); train.eval_interval is ignored", flush=True)


@dataclass
class Run:
    """What the training loop needs, built on every rank by `build_run`."""

    cfg: RunConfig
    runtime: Runtime
    par: Parallel
    optimizer: torch.optim.Optimizer
    schedule: LRScheduler
    checkpoints: Checkpointer
    train_batches: TokenBatches | PrefetchedBatches
    val_batches: list[Batch]  # empty under PP, whose schedules have no evaluation step
    first: int  # the last step already taken: 0, or the resumed checkpoint's
    end: int  # the last step this run takes
    throughput: Throughput
    metrics: MetricsLogger | None  # rank 0's


def train(cfg: RunConfig, resume: bool) -> None:
    train_loop(build_run(cfg, resume))


def build_run(cfg: RunConfig, resume: bool) -> Run:
    """Set the process up, build this rank's data, model part, optimizer, LR schedule and
    checkpointer, resume (or refuse to overwrite a run), and on rank 0 write the run's config,
    print its header and open its metrics."""
    runtime = set_up(cfg.train)
    par = start(cfg, runtime)
    t = cfg.train
    _, train_batches, val_batches = build_data(cfg.data, t, cfg.model.vocab_size, par.dp_rank, par.dp_size, str(runtime.device))
    eval_skipped = par.shape["pp"] > 1 and bool(val_batches) and t.eval_interval > 0
    if par.shape["pp"] > 1:
        val_batches = []
    model = HybridLM(cfg.model).to(runtime.device)
    ops_line = plan_model(model, runtime.device, runtime.dtype)  # fla or PyTorch per op, decided once
    num_params, flops_per_token = model.num_params(), model.flops_per_token(t.seq_len)
    parallelize(par, model, cfg, runtime)
    optimizer = build_optimizer(par.module, cfg.optim)
    schedule = build_lr_schedule(optimizer, t.steps, **cfg.optim.schedule_options)
    checkpoints = build_checkpointer(checkpoint_dir(cfg), cfg.checkpoint, {"config.yaml": dump_config(cfg)}, {"world_size": par.world_size, **par.shape})
    if resume:
        first = checkpoints.resume(par.module, optimizer, schedule, train_batches)
    else:
        refuse_to_overwrite(checkpoints.root)
        first = 0
    checkpoints.attach(optimizer)  # the optimizer waits for a requested snapshot before it steps
    end = min(t.steps, t.stop_at_step or t.steps)
    run_dir = Path(t.run_dir)
    metrics = None
    if par.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        print_header(cfg, num_params, par, runtime, first, end, eval_skipped)
        print(ops_line, fast_path_header(par, cfg), sep="\n", flush=True)
        metrics = MetricsLogger(run_dir, cfg.logging, t.steps, first, cfg.model_dump(mode="json"))
    # only rank 0 reports MFU; on CPU the other ranks measuring at once would also skew its peak
    peak = peak_flops(runtime.device) if par.is_main else None
    cluster_peak = None if peak is None else peak * par.world_size
    throughput = Throughput(tokens_per_step(t, par.dp_size), 3 * flops_per_token, cluster_peak)
    return Run(cfg, runtime, par, optimizer, schedule, checkpoints, train_batches, val_batches, first, end, throughput, metrics)


def train_loop(run: Run) -> None:
    """Steps first+1 .. end, each logged and checkpointed as configured; then wait for the last
    checkpoint and, on rank 0, print the summary."""
    cfg, began, record = run.cfg, time.perf_counter(), {}
    for step in range(run.first + 1, run.end + 1):
        record = run_step(run, step)
        if run.metrics is not None and len(record) > 1:
            run.metrics.log(record)
        if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or (step == run.end and cfg.checkpoint.save_final):
            run.checkpoints.save(step, run.par.module, run.optimizer, run.schedule, run.train_batches, final=step == run.end)
    saved = run.checkpoints.finalize()
    if run.metrics is not None:
        run.metrics.close()
        print(summary(run.first, run.end, time.perf_counter() - began, record, saved))


def run_step(run: Run, step: int) -> dict:
    """Train one step; its record: the step, and its metrics on a logged step, and the evaluation
    on an evaluated one."""
    t = run.cfg.train
    lr, tick = run.optimizer.param_groups[0]["lr"], time.perf_counter()
    result = train_step(run.par, run.optimizer, run.train_batches, t.grad_accum, t.grad_clip, run.runtime)
    run.schedule.step()
    log_now = step % t.log_interval == 0 or step == run.end
    if log_now:
        run.runtime.synchronize()
    run.throughput.add_step(time.perf_counter() - tick)
    record = {"step": step} | (train_record(result, lr, run.throughput, run.runtime) | mixture_record(run.train_batches) if log_now else {})
    if run.val_batches and t.eval_interval and (step % t.eval_interval == 0 or step == run.end):
        record |= evaluate(run.par, run.val_batches, run.runtime)
    return record


def train_record(result: StepResult, lr: float, throughput: Throughput, runtime: Runtime) -> dict:
    tokens_per_s, mfu = throughput.take()
    record = {
        "loss": result.loss.item(), "lr": lr, "grad_norm": result.grad_norm.item(),
        "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_mem_mb": peak_memory_mb(runtime.device),
    }
    return record if result.aux_loss is None else record | {"aux_loss": result.aux_loss.item()}


def summary(start: int, end: int, seconds: float, last: dict, saved: Path | None) -> str:
    parts = [f"done: steps {start + 1}..{end} in {seconds:.1f}s"] if end > start else [f"done: nothing to train (at step {start})"]
    if "loss" in last:
        parts.append(f"loss {last['loss']:.4f}")
    if "eval_loss" in last:
        parts.append(f"eval loss {last['eval_loss']:.4f} (ppl {last['eval_ppl']:.2f})")
    if saved is not None:
        parts.append(f"checkpoint {saved}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(load_config(args.config, args.overrides), args.resume)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
