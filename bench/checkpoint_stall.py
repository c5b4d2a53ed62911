"""Training-loop stall per checkpoint, and the end-to-end cost of checkpointing every 10 steps.

    python bench/checkpoint_stall.py                  # CPU
    python bench/checkpoint_stall.py --device cuda    # CUDA: device-to-host copies on a side stream

A HybridLM of about 110M parameters (12 attention blocks, d_model 768, vocab 32000) with fp32
AdamW: 12 bytes per parameter of model + optimizer state, about 1.3 GB per checkpoint.

Stall: the time the training loop is blocked by one checkpoint: the request itself plus, for the
background modes, the wait before the next optimizer step for the snapshot to be in host memory.
Each background flush is drained before the next request, so a busy policy never adds to it; the
time from request to committed checkpoint is reported as the mode's flush time (for a background
mode an upper bound: the drain starts after the training step the flush overlaps). Modes:
`torch.save` of the full state dict (no fsync), ebb's `sync` (DCP save + commit), `async` (DCP
async_save) and `lazy`; each reported as a ratio to lazy's median stall.

End to end: one training run alternates intervals of `--interval` steps without a checkpoint and
intervals that begin with a lazy checkpoint and end once it is committed (the wait a checkpointing
run has at its next request, under `when_busy: wait`), `--e2e-repeats` of each; the ratio of their
total times is the slowdown of checkpointing every `--interval` steps. Alternating intervals of a
few seconds, rather than whole runs, keeps a shared machine's drifting load out of the ratio. The
first checkpoint, which allocates and first touches the host buffers (once per run), is taken
before the clock starts and reported apart. On a CPU the background copy and flush compete with
training for the same cores, which this figure includes; `--threads 1` leaves the flush a core.
Results go to bench/results/checkpoint-<device>-seq<S>-threads<N>.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from checkpoint import MODES as CHECKPOINT_MODES
from checkpoint import CheckpointConfig, Checkpointer, build_checkpointer
from models.config import ModelConfig
from models.model import HybridLM
from optim.adamw import build_optimizer
from optim.config import OptimConfig
from optim.schedules import build_lr_schedule

MODES = ("torch.save", *CHECKPOINT_MODES)


class Position:
    """Stand-in for the data loader's resumable position."""

    def __init__(self) -> None:
        self.row = 0

    def state_dict(self) -> dict[str, int]:
        return {"row": self.row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.row = state["row"]


class Trainer:
    """A model, its AdamW and schedule, and a step on random tokens."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, torch.device(args.device)
        torch.manual_seed(0)
        config = ModelConfig(pattern="*" * args.layers, d_model=args.d_model, vocab_size=args.vocab_size)
        self.model = HybridLM(config).to(self.device)
        self.optimizer = build_optimizer(self.model, OptimConfig())
        self.schedule = build_lr_schedule(self.optimizer, 10_000, **OptimConfig(warmup_steps=10).schedule_options)
        self.data = Position()

    def state_bytes(self) -> int:
        """Bytes of model + optimizer state (once a step has created AdamW's moments)."""
        tensors = list(self.model.state_dict().values()) + [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def step(self, before_update: Callable[[], None] = lambda: None) -> float:
        """One training step; the seconds spent in `before_update` (the wait for a snapshot)."""
        ids = torch.randint(0, self.args.vocab_size, (self.args.batch_size, self.args.seq_len + 1), device=self.device)
        logits = self.model(ids[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        began = time.perf_counter()
        before_update()
        blocked = time.perf_counter() - began
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.data.row += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return blocked

    def save(self, saver: Checkpointer | None, root: Path, step: int) -> None:
        if saver is None:
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, root / f"full-{step}.pt")
        else:
            saver.save(step, self.model, self.optimizer, self.schedule, self.data)


def checkpointer(mode: str, root: Path, args: argparse.Namespace) -> Checkpointer | None:
    if mode == "torch.save":
        return None
    return build_checkpointer(root, CheckpointConfig(mode=mode, keep_last=1, host_buffer_gb=args.host_buffer_gb))


def measure_stalls(mode: str, root: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Per checkpoint: (seconds the loop was blocked, seconds from request to commit; for a
    background mode the latter ends no earlier than the training step it overlaps)."""
    trainer, saver = Trainer(args), checkpointer(mode, root, args)
    trainer.step()  # optimizer state exists from here on
    stalls, flushes = [], []
    for k in range(args.checkpoints):
        trainer.step()
        began = time.perf_counter()
        trainer.save(saver, root, k)
        if args.device == "cuda":
            torch.cuda.synchronize()
        requested = time.perf_counter() - began
        stalls.append(requested + trainer.step(saver.before_optimizer_step if saver else lambda: None))
        if saver is not None and saver.background:
            saver.wait_until_durable()
            flushes.append(time.perf_counter() - began)
        else:
            flushes.append(requested)
    if saver is not None:
        saver.finalize()
    return stalls, flushes


def end_to_end(root: Path, args: argparse.Namespace) -> tuple[list[float], list[float], float]:
    """Seconds of each plain interval and of each checkpointed one, and of the first checkpoint."""
    trainer, saver = Trainer(args), checkpointer("lazy", root, args)
    saver.attach(trainer.optimizer)
    trainer.step()
    began = time.perf_counter()
    trainer.save(saver, root, 0)
    trainer.step()
    saver.wait_until_durable()
    first = time.perf_counter() - began
    plain, checkpointed = [], []
    for k in range(1, args.e2e_repeats + 1):
        began = time.perf_counter()
        for _ in range(args.interval):
            trainer.step()
        plain.append(time.perf_counter() - began)
        began = time.perf_counter()
        trainer.save(saver, root, k)
        for _ in range(args.interval):
            trainer.step()
        saver.wait_until_durable()
        checkpointed.append(time.perf_counter() - began)
    saver.finalize()
    return plain, checkpointed, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints timed per mode")
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--e2e-repeats", type=int, default=6, help="intervals of each kind, alternated")
    parser.add_argument("--host-buffer-gb", type=float, default=64.0)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary directory)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 keeps a shared machine's noise down)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.dir or tempfile.mkdtemp(prefix="ebb-bench-checkpoint-"))
    sizing = Trainer(args)
    sizing.step()
    state_gb = sizing.state_bytes() / 1e9
    del sizing
    stalls, flushes = {}, {}
    for mode in args.modes:
        shutil.rmtree(work / mode, ignore_errors=True)
        (work / mode).mkdir(parents=True)
        stall, flush = measure_stalls(mode, work / mode, args)
        stalls[mode], flushes[mode] = statistics.median(stall), statistics.median(flush)
        shutil.rmtree(work / mode, ignore_errors=True)
    plain, lazy, first = end_to_end(work / "e2e", args)
    shutil.rmtree(work, ignore_errors=True)

    lazy_stall = stalls.get("lazy")
    print(f"checkpoint stall per save, {args.device}, model + AdamW state {state_gb:.2f} GB")
    print(f"{'mode':<12}{'stall vs lazy':>16}{'stall':>10}{'flush':>10}")
    for mode, stall in stalls.items():
        print(f"{mode:<12}{stall / lazy_stall if lazy_stall else float('nan'):>15.1f}x{stall:>9.3f}s{flushes[mode]:>9.2f}s")
    ratio, step_s = sum(lazy) / sum(plain), sum(plain) / (args.interval * len(plain))
    print(
        f"end to end: lazy every {args.interval} steps ({args.interval * step_s:.1f} s of training at {step_s:.3f} s/step)"
        f" / no checkpoints = {ratio:.3f} ({len(plain)} intervals of each)"
    )
    print(
        f"  training time lost per checkpoint: {(sum(lazy) - sum(plain)) / len(lazy):.2f} s;"
        f" the first checkpoint of a run (allocating its host buffers), untimed above: {first:.2f} s"
    )
    relative = {k: " ".join(f"{t * len(plain) / sum(plain):.2f}" for t in v) for k, v in {"none": plain, "lazy": lazy}.items()}
    print("  each interval / the mean plain one: " + ", ".join(f"{k} {v}" for k, v in relative.items()))
    out = Path(__file__).parent / "results" / f"checkpoint-{args.device}-seq{args.seq_len}-threads{torch.get_num_threads()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "args": vars(args), "model_state_gb": state_gb, "stall_s": stalls, "flush_s": flushes, "first_checkpoint_s": first,
        "stall_vs_lazy": {m: s / lazy_stall for m, s in stalls.items()} if lazy_stall else None,
        "e2e_intervals_s": {"none": plain, "lazy": lazy}, "e2e_ratio": ratio,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
