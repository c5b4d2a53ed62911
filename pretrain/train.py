"""Pretrain a HybridLM from a config file.

    python -m pretrain.train --config configs/quickstart.yaml [--resume] [section.key=value ...]
    python -m pretrain.train --config configs/quickstart.yaml --dry-run [--world-size 8]
    torchrun --nproc-per-node 4 -m pretrain.train --config ... parallel.tp=2   # see launch/torchrun.sh

Under torchrun every rank runs this loop on its part of the model (pretrain/parallelize.py); rank
0 alone prints, logs metrics and writes the run directory's files. `train` is `build_run` (all
that the loop needs, as a `Run`) then `train_loop`.

How a run ends: done (exit 0); a one-line `error:` (exit 2) for a bad config, data, layout,
directory or checkpoint, a run directory another run owns, or a diverged step; a signal
(SIGTERM, SIGINT: the step finishes, a checkpoint is saved, exit 128 + the signal); a launcher
that is gone (the step finishes, the checkpoint being written commits, exit 129); or a peer that
is gone or hung (the collective fails at once, or after `parallel.collective_timeout_s`; exit 2).
Every rank meets the same error at the same point, and rank 0 alone prints it; a lost peer is
said by each rank that lost it.
"""
from __future__ import annotations

import os
import signal
import sys


def _stop_while_loading(signum: int, frame: object) -> None:
    """SIGTERM or SIGINT while the libraries load (seconds, before `main` handles signals):
    nothing has started, so the process ends with one line instead of a traceback from inside
    some import."""
    if os.environ.get("RANK", "0") == "0":
        print(f"ebb: {signal.Signals(signum).name} while starting: stopped, nothing to save", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


PARENT_AT_START = os.getppid()  # the launcher, if it is one, even if it dies while the libraries load

if __name__ == "__main__":
    for _signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(_signum) is not signal.SIG_IGN:
            signal.signal(_signum, _stop_while_loading)

# The imports below come after that handler on purpose: loading them takes seconds.
import argparse
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LRScheduler

from checkpoint import Checkpointer, CheckpointError, CheckpointMismatch, build_checkpointer, find_latest
from checkpoint.manager import step_dir_name
from common.processes import is_main_process, new_gloo_group
from models.model import HybridLM
from models.ops import plan_model
from models.ops.fla_configs import capture_from_env
from optim.adamw import build_optimizer
from optim.offload import OffloadAdamW, OffloadError
from optim.schedules import build_lr_schedule
from parallel.mesh import ParallelError
from pretrain.config import ConfigError, RunConfig, TrainConfig, dump_config, load_config
from pretrain.data import Batch, DataError, build_data
from pretrain.data.loader import PrefetchedBatches, TokenBatches, mixture_record
from pretrain.dry_run import describe_run
from pretrain.errors import Interrupted, PeersLost, RunError, collective_failure
from pretrain.evaluation.loop import DownstreamEvaluation, start_downstream
from pretrain.evaluation.tasks import EvaluationError
from pretrain.metrics import MetricsLogger, Throughput, peak_memory_mb
from pretrain.parallelize import Parallel, fast_path_header, parallelize, start
from pretrain.peak_flops import peak_flops
from pretrain.preflight import DirectoryLock, checkpoint_root, claim_run
from pretrain.runtime import Runtime, set_up
from pretrain.signals import LAUNCHER_GONE_STATUS, Stop, StopSignals, exit_status, say, say_anyway, say_for_node, signal_name
from pretrain.step import StepResult, evaluate, train_step

USER_ERRORS = (ConfigError, DataError, CheckpointError, ParallelError, RunError, OffloadError, EvaluationError)
STATE_SECTIONS = ("model", "optim")  # the config sections that shape a checkpoint's tensors
ERROR_GRACE_S = 5.0  # under torchrun, how long ranks other than 0 wait before reporting an error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run config (YAML); defaults when omitted")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the checkpoint dir")
    parser.add_argument("--dry-run", action="store_true", help="print the layout, parameter counts and a memory estimate per rank; build and train nothing")
    parser.add_argument(
        "--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
        help="--dry-run: the processes to lay the run out on (default: WORLD_SIZE, else 1)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_intermixed_args(argv)


def tokens_per_step(t: TrainConfig, dp_size: int) -> int:
    """Tokens in one step's global batch: every data-parallel rank's batches."""
    return dp_size * t.batch_size * t.seq_len * t.grad_accum


def refuse_to_overwrite(root: Path) -> None:
    if latest := find_latest(root):
        raise CheckpointError(f"{root} already holds checkpoints (latest {latest.name}); pass --resume to continue, or use another train.run_dir")


def print_header(
    cfg: RunConfig, num_params: int, par: Parallel, runtime: Runtime, first: int, end: int, resumed_from: Path | None
) -> None:
    t = cfg.train
    layout = " x ".join(f"{dim} {size}" for dim, size in par.shape.items() if size > 1) or "one process"
    resumed = f", resumed from {resumed_from}" if resumed_from is not None else ""
    print(
        f"ebb: {num_params / 1e6:.2f}M params ({cfg.model.pattern!r}), {tokens_per_step(t, par.dp_size)} tokens/step, "
        f"steps {first + 1}..{end} of {t.steps}, {layout}, device {runtime.device} ({str(runtime.dtype).removeprefix('torch.')}), "
        f"threads {torch.get_num_threads()}, run dir {t.run_dir}{resumed}",
        flush=True,
    )


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
    val_batches: list[Batch]
    first: int  # the last step already taken: 0, or the resumed checkpoint's
    end: int  # the last step this run takes
    throughput: Throughput
    metrics: MetricsLogger | None  # rank 0's
    control: dist.ProcessGroup | None = None  # gloo, every rank: agreements on the training thread
    locks: list[DirectoryLock] = field(default_factory=list)  # rank 0's, on the run's directories
    stop: StopSignals | None = None  # the signals the loop stops at (None: run in-process, by a test)
    downstream: DownstreamEvaluation | None = None  # the evaluation section's tasks (None: none)
    skipped: int = 0  # consecutive steps whose update was skipped (train.on_nonfinite=skip_step)


def train(cfg: RunConfig, resume: bool, stop: StopSignals | None = None) -> None:
    run = build_run(cfg, resume, stop)
    try:
        train_loop(run)
    finally:
        release(run.locks)


def release(locks: list[DirectoryLock]) -> None:
    for lock in locks:
        lock.release()


def control_group() -> dist.ProcessGroup | None:
    """A gloo group of every rank for the loop's agreements (None in one process)."""
    return new_gloo_group() if dist.is_initialized() else None


def build_run(cfg: RunConfig, resume: bool, stop: StopSignals | None = None) -> Run:
    """Set the process up, claim the run's directories (`pretrain.preflight`), build this rank's
    data, model part, optimizer, LR schedule and checkpointer, resume (or refuse to overwrite a
    run), and on rank 0 write the run's config, print its header and open its metrics."""
    runtime = set_up(cfg.train)
    par = start(cfg, runtime)
    control = control_group()
    locks = claim_run(cfg, par.is_main, control)
    try:
        downstream = start_downstream(cfg, runtime, par.is_main, par.world_size, control)  # a task that does not load stops the run here
        run = build_claimed_run(cfg, resume, runtime, par)
    except BaseException:
        release(locks)
        raise
    run.control, run.locks, run.stop, run.downstream = control, locks, stop, downstream
    return run


def build_claimed_run(cfg: RunConfig, resume: bool, runtime: Runtime, par: Parallel) -> Run:
    """`build_run` once the run owns its directories."""
    t = cfg.train
    _, train_batches, val_batches = build_data(cfg.data, t, cfg.model.vocab_size, par.dp_rank, par.dp_size, str(runtime.device))
    model = HybridLM(cfg.model).to(runtime.device)
    ops_line = plan_model(model, runtime.device, runtime.dtype)  # fla or PyTorch per op, decided once
    num_params, flops_per_token = model.num_params(), model.flops_per_token(t.seq_len)
    parallelize(par, model, cfg, runtime)
    optimizer = build_optimizer(par.module, cfg.optim)
    if isinstance(optimizer, OffloadAdamW):  # its hooks copy gradients to the host in a step's last backward
        optimizer.backwards_per_step = par.microbatches if par.pipeline is not None else t.grad_accum
    schedule = build_lr_schedule(optimizer, t.steps, **cfg.optim.schedule_options)
    checkpoints = build_checkpointer(checkpoint_root(cfg), cfg.checkpoint, {"config.yaml": dump_config(cfg)}, checkpoint_layout(par, cfg))
    if resume:
        try:
            first = checkpoints.resume(par.module, optimizer, schedule, train_batches)
        except CheckpointMismatch as exc:
            raise CheckpointError(explain_mismatch(exc, cfg)) from None
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
        print_header(cfg, num_params, par, runtime, first, end, checkpoints.resumed_from)
        print(ops_line, fast_path_header(par, cfg), *([optimizer.header] if isinstance(optimizer, OffloadAdamW) else []), sep="\n", flush=True)
        metrics = MetricsLogger(run_dir, cfg.logging, t.steps, first, cfg.model_dump(mode="json"))
    # only rank 0 reports MFU; on CPU the other ranks measuring at once would also skew its peak
    peak = peak_flops(runtime.device) if par.is_main else None
    cluster_peak = None if peak is None else peak * par.world_size
    throughput = Throughput(tokens_per_step(t, par.dp_size), 3 * flops_per_token, cluster_peak)
    return Run(cfg, runtime, par, optimizer, schedule, checkpoints, train_batches, val_batches, first, end, throughput, metrics)


def checkpoint_layout(par: Parallel, cfg: RunConfig) -> dict[str, Any]:
    """What each checkpoint's manifest records of the layout: a resume under another one says
    that it reshards (`checkpoint.manager.resume`)."""
    return {"world_size": par.world_size, **par.shape, "offload": cfg.optim.offload.enabled}


def flat_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (lists stay whole values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flat_keys(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...] = STATE_SECTIONS) -> list[str]:
    """The keys of `sections` whose values differ, each with both values."""
    before, now = flat_keys(saved), flat_keys(current)
    keys = sorted(k for k in before.keys() | now.keys() if k.split(".")[0] in sections and before.get(k) != now.get(k))
    return [f"{k} ({before.get(k)!r} there, {now.get(k)!r} here)" for k in keys]


def explain_mismatch(exc: CheckpointMismatch, cfg: RunConfig) -> str:
    """An intact checkpoint that does not load, described by the model and optimizer keys whose
    values differ from the config it was saved with (its config.yaml), else by the load error."""
    try:
        saved = load_config(exc.path / "config.yaml").model_dump(mode="json")
    except (ConfigError, OSError):
        return str(exc)
    differences = config_differences(saved, cfg.model_dump(mode="json"))
    if not differences:
        return str(exc)
    return (
        f"checkpoint {exc.path} was saved with another config: {', '.join(differences)}; "
        "resume with its values, or start another train.run_dir (the checkpoint is intact)"
    )


def train_loop(run: Run) -> None:
    """Steps first+1 .. end, each logged and checkpointed as configured, stopping early on a
    signal or a launcher's death (`stop_early`) or a diverged step (`on_nonfinite`); then wait for
    the last checkpoint and, on rank 0, print the summary. A run that stops with an error first
    waits for the checkpoints already requested, which hold good states; one whose peers are lost
    waits for nothing (`PeersLost`)."""
    cfg, began, record, step = run.cfg, time.perf_counter(), {}, run.first
    if run.stop is not None:
        run.stop.in_loop = True
    try:
        for step in range(run.first + 1, run.end + 1):
            record = run_step(run, step)
            if step == run.first + 1 and run.par.is_main and (captured := capture_from_env()):
                print(captured, flush=True)  # EBB_FLA_CONFIGS_CAPTURE: what the first step's autotuning chose
            if run.metrics is not None and len(record) > 1:
                run.metrics.log(record)
            if record.get("skipped"):
                on_nonfinite(run, step, record)
            else:
                run.skipped = 0
            due = bool(cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or (step == run.end and cfg.checkpoint.save_final)
            requested = due and run.checkpoints.save(step, run.par.module, run.optimizer, run.schedule, run.train_batches, final=step == run.end)
            if step < run.end and (stop := stop_requested(run)) is not None:
                stop_early(run, step, stop, requested)
        saved = run.checkpoints.finalize()
    except (RunError, Interrupted):
        with contextlib.suppress(CheckpointError):
            run.checkpoints.finalize()
        raise
    except Exception as exc:
        if (cause := collective_failure(exc)) is None:
            raise
        raise lost_peers(cause, run.stop, step, newest_checkpoint(run)) from None
    finally:
        if run.metrics is not None:
            run.metrics.close()
    if run.metrics is not None:
        print(summary(run.first, run.end, time.perf_counter() - began, record, saved))


def on_nonfinite(run: Run, step: int, record: dict[str, Any]) -> None:
    """A step whose update was skipped because its loss or gradient norm is not finite: stop
    (`train.on_nonfinite=stop`, or past `train.max_skipped_steps` in a row), else warn."""
    t = run.cfg.train
    run.skipped += 1
    values = f"loss {record['loss']:.4g}, gradient norm {record['grad_norm']:.4g}"
    if t.on_nonfinite == "stop":
        run.checkpoints.wait_until_durable()
        raise RunError(
            f"step {step} diverged ({values}); stopped before its update, so no checkpoint holds it "
            f"(newest: {newest_checkpoint(run)}; train.on_nonfinite=stop: lower optim.lr, or set train.on_nonfinite=skip_step)"
        )
    if run.skipped >= t.max_skipped_steps:
        run.checkpoints.wait_until_durable()
        raise RunError(
            f"step {step}: {run.skipped} steps in a row diverged ({values}); stopped (train.max_skipped_steps={t.max_skipped_steps}; "
            f"newest checkpoint: {newest_checkpoint(run)})"
        )
    say(f"ebb: warning: step {step} diverged ({values}); its update was skipped ({run.skipped} in a row, train.on_nonfinite=skip_step)")


def newest_checkpoint(run: Run) -> str:
    latest = find_latest(run.checkpoints.root)
    return str(latest) if latest is not None else "none yet"


def stop_requested(run: Run) -> Stop | None:
    """Why the run stops after this step, agreed by every rank; None to go on."""
    return None if run.stop is None else run.stop.agreed(run.control)


def stop_early(run: Run, step: int, stop: Stop, requested: bool) -> None:
    """After this step: a signal asks for a checkpoint of it, a launcher's death does not."""
    if stop.signum is not None:
        stop_on_signal(run, step, stop.signum, requested)
    else:
        stop_without_launcher(run, step)


def stop_without_launcher(run: Run, step: int) -> None:
    """A launcher is gone: let the checkpoint already requested commit (its ranks' connections
    still work), start none, say so once per node whose launcher is gone (rank 0 also for another
    node's), and end the run with `LAUNCHER_GONE_STATUS`."""
    run.checkpoints.finalize()
    where = f"stopped after step {step} (newest checkpoint: {newest_checkpoint(run)}); continue with --resume"
    if run.stop.launcher_gone:
        say_for_node(f"ebb: the launcher (pid {run.stop.launcher}) is gone: {where}")
    else:
        say(f"ebb: the launcher of another node is gone: {where}")
    raise Interrupted(LAUNCHER_GONE_STATUS)


def lost_peers(cause: str, stop: StopSignals | None, step: int | None = None, newest: str | None = None) -> PeersLost:
    """The error of a rank whose collective failed at `step` (None: before the first), when the
    newest checkpoint was `newest`."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    launcher = f"; its launcher (pid {stop.launcher}) is gone" if stop is not None and stop.launcher_gone else ""
    if step is None:
        return PeersLost(f"error: rank {rank} lost contact with the other ranks before the first step ({cause}{launcher}); stopped, nothing to save")
    return PeersLost(
        f"error: rank {rank} lost contact with the other ranks at step {step} ({cause}{launcher}); "
        f"stopped (newest checkpoint: {newest}; continue with --resume once every rank can run)"
    )


def stop_on_signal(run: Run, step: int, signum: int, requested: bool) -> None:
    """After a signal: checkpoint this step (unless `checkpoint.on_signal=exit`, or it was
    `requested` already), wait until it is committed, say so in one line, and end the run with
    the signal's exit status. (After the last step the run just ends as it would have.)"""
    name, keep = signal_name(signum), run.cfg.checkpoint.on_signal == "save"
    if keep and not requested:
        run.checkpoints.save(step, run.par.module, run.optimizer, run.schedule, run.train_batches, final=True)
    saved = run.checkpoints.finalize()
    if keep and saved is not None and saved.name == step_dir_name(step):
        say(f"ebb: {name} after step {step}: saved {saved}; continue with --resume")
    elif keep:
        say(f"ebb: {name} after step {step}: its checkpoint was not saved; stopped (newest checkpoint: {newest_checkpoint(run)})")
    else:
        say(f"ebb: {name} after step {step}: stopped without a checkpoint (checkpoint.on_signal=exit; newest: {newest_checkpoint(run)})")
    raise Interrupted(exit_status(signum))


def run_step(run: Run, step: int) -> dict:
    """Train one step; its record: the step, and its metrics on a logged step, and the evaluation
    on an evaluated one."""
    t = run.cfg.train
    lr, tick = run.optimizer.param_groups[0]["lr"], time.perf_counter()
    result = train_step(run.par, run.optimizer, run.train_batches, t.grad_accum, t.grad_clip, run.runtime)
    run.schedule.step()
    log_now = step % t.log_interval == 0 or step == run.end or not result.stepped
    if log_now:
        run.runtime.synchronize()
    run.throughput.add_step(time.perf_counter() - tick)
    record = {"step": step} | (train_record(result, lr, run.throughput, run.runtime) | mixture_record(run.train_batches) if log_now else {})
    if not result.stepped:
        record["skipped"] = True
    if run.val_batches and t.eval_interval and (step % t.eval_interval == 0 or step == run.end):
        record |= evaluate(run.par, run.val_batches, run.runtime)
    if run.downstream is not None and run.downstream.due(step, run.end):
        record |= run.downstream.run(run.par.module, run.par.is_main)
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
    if last.get("loss") is not None:
        parts.append(f"loss {last['loss']:.4f}")
    if last.get("eval_loss") is not None:
        parts.append(f"eval loss {last['eval_loss']:.4f} (ppl {last['eval_ppl']:.2f})")
    if saved is not None:
        parts.append(f"checkpoint {saved}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """The command line; its exit status (see the module docstring)."""
    status, message = run_command(parse_args(argv))
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        report(message)
        return status
    if message is not None and not is_main_process():
        # Every rank meets the same error; rank 0 says it. The others wait, so that rank 0's
        # line is the one a launcher relays (torchrun ends the others once one exits); a rank
        # still here afterwards met an error of its own, and says it.
        time.sleep(ERROR_GRACE_S)
    report(message)
    # Past the interpreter's teardown, whose gloo and thread clean-up can abort or hang after a
    # failed collective and would turn the status into another.
    os._exit(status)


def run_command(args: argparse.Namespace) -> tuple[int, str | None]:
    """Run the command; its exit status and the line still to print (None when none). A rank
    whose peers are lost says so at once (its line is its own) and leaves the process group as it
    is: tearing it down could wait on the peers."""
    stop, lost = StopSignals.install(), False
    try:
        cfg = load_config(args.config, args.overrides)
        stop.watch_launcher(PARENT_AT_START, cfg.parallel.collective_timeout_s)
        if args.dry_run:
            text = describe_run(cfg, args.world_size)
            if is_main_process():
                print(text)
        else:
            train(cfg, args.resume, stop)
    except USER_ERRORS as exc:
        return 2, f"error: {exc}"
    except Interrupted as exc:
        return exc.status, exc.message
    except PeersLost as exc:
        lost = True
        say_anyway(str(exc))
        return 2, None
    except Exception as exc:
        if (cause := collective_failure(exc)) is None:
            raise
        lost = True
        say_anyway(str(lost_peers(cause, stop)))
        return 2, None
    finally:
        stop.restore()
        if dist.is_initialized() and not lost:
            dist.destroy_process_group()
    return 0, None


def report(line: str | None) -> None:
    """`line` on stderr, and stdout flushed, unless they are gone (a killed launcher's pipes)."""
    with contextlib.suppress(OSError):
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
