"""Training-loop stall per checkpoint, and the end-to-end cost of checkpointing every 10 steps.

    python bench/checkpoint_stall.py                  # CPU
    python bench/checkpoint_stall.py --device cuda    # CUDA: device-to-host copies on a side stream
    python bench/checkpoint_stall.py --modes lazy --offload off on    # lazy, with and without optimizer offload
    python bench/checkpoint_stall.py --tiny           # CPU, toy sizes: every measurement, so it cannot rot

A HybridLM of about 110M parameters (12 attention blocks, d_model 768, vocab 32000) with fp32
AdamW: 12 bytes per parameter of model + optimizer state, about 1.3 GB per checkpoint.

Stall: the time the training loop is blocked by one checkpoint: the request itself plus, for the
background modes, the wait before the next optimizer step for the snapshot to be in host memory.
Each background flush is drained before the next request, so a busy policy never adds to it; the
time from request to committed checkpoint is reported as the mode's flush time (for a background
mode an upper bound: the drain starts after the training step the flush overlaps). Modes:
`torch.save` of the full state dict (no fsync), ebb's `sync` (DCP save + commit), `async` (DCP
async_save) and `lazy`; each reported as a ratio to lazy's median stall and to its own flush.

Optimizer offload (`--offload on`: `optim.offload` with `--subgroup-size` subgroups, k from the
performance model, 0 on a CPU): the fp32 moments live in host buffers that the lazy checkpoint
writes in place while the next step updates them, subgroup by subgroup (README: Checkpoints and
resume). There the stall also counts the time the step was held by subgroups the writer had not
read yet (waiting, or copying them aside), and lazy is measured with each `--staging-subgroups`
(0: the step waits; n: up to n subgroups copied aside).

End to end, for lazy under each offload setting: one training run alternates intervals of
`--interval` steps without a checkpoint and intervals that begin with a lazy checkpoint and end once it is committed (the wait a checkpointing
run has at its next request, under `when_busy: wait`), `--e2e-repeats` of each; the ratio of their
total times is the slowdown of checkpointing every `--interval` steps (and, steadier on a busy
machine, the median ratio of each checkpointed interval to the plain one just before it). Alternating intervals of a
few seconds, rather than whole runs, keeps a shared machine's drifting load out of the ratio. The
first checkpoint, which allocates and first touches the host buffers (once per run), is taken
before the clock starts and reported apart. On a CPU the background copy and flush compete with
training for the same cores, which this figure includes; `--threads 1` leaves the flush a core.
Results go to bench/results/checkpoint-<device>-seq<S>-threads<N>.json (or `--out`).
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
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
TINY = dict(layers=2, d_model=64, vocab_size=256, seq_len=16, checkpoints=1, interval=2, e2e_repeats=1, subgroup_size=4096)


@dataclass(frozen=True)
class Setting:
    """One row of the stall table: a mode, with or without offload, and its staging slots."""

    mode: str
    offload: bool = False
    staging: int = 2

    @property
    def label(self) -> str:
        return self.mode + (f" offload, staging {self.staging}" if self.offload and self.mode == "lazy" else " offload" if self.offload else "")


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

    def __init__(self, args: argparse.Namespace, offload: bool = False):
        self.args, self.device = args, torch.device(args.device)
        torch.manual_seed(0)
        config = ModelConfig(pattern="*" * args.layers, d_model=args.d_model, vocab_size=args.vocab_size)
        self.model = HybridLM(config).to(self.device)
        offloaded = {"enabled": True, "subgroup_size": args.subgroup_size, "host_optimizer": "torch"}
        self.optimizer = build_optimizer(self.model, OptimConfig(offload=offloaded) if offload else OptimConfig())
        self.schedule = build_lr_schedule(self.optimizer, 10_000, **OptimConfig(warmup_steps=10).schedule_options)
        self.data = Position()

    def state_bytes(self) -> int:
        """Bytes of model + optimizer state (once a step has created AdamW's moments)."""
        tensors = list(self.model.state_dict().values()) + [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def header(self) -> str | None:
        """The offloading optimizer's line about what it decided, if it offloads."""
        return getattr(self.optimizer, "header", None)

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


def checkpointer(setting: Setting, root: Path, args: argparse.Namespace) -> Checkpointer | None:
    if setting.mode == "torch.save":
        return None
    settings = CheckpointConfig(mode=setting.mode, keep_last=1, host_buffer_gb=args.host_buffer_gb, staging_subgroups=setting.staging)
    return build_checkpointer(root, settings)


def held_in_step(saver: Checkpointer | None) -> float:
    """Seconds the last optimizer step was held by an in-place flush (subgroups not yet read)."""
    flush = getattr(saver, "in_place", None)
    return flush.stall_s if flush is not None else 0.0


def measure_stalls(setting: Setting, root: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Per checkpoint: (seconds the loop was blocked, seconds from request to commit; for a
    background mode the latter ends no earlier than the training step it overlaps)."""
    trainer, saver = Trainer(args, setting.offload), checkpointer(setting, root, args)
    trainer.step()  # optimizer state exists from here on
    stalls, flushes = [], []
    for k in range(args.checkpoints):
        trainer.step()
        began = time.perf_counter()
        trainer.save(saver, root, k)
        if args.device == "cuda":
            torch.cuda.synchronize()
        requested = time.perf_counter() - began
        stalls.append(requested + trainer.step(saver.before_optimizer_step if saver else lambda: None) + held_in_step(saver))
        if saver is not None and saver.background:
            saver.wait_until_durable()
            flushes.append(time.perf_counter() - began)
        else:
            flushes.append(requested)
    if saver is not None:
        saver.finalize()
    return stalls, flushes


def end_to_end(setting: Setting, root: Path, args: argparse.Namespace) -> tuple[list[float], list[float], float]:
    """Seconds of each plain interval and of each checkpointed one, and of the first checkpoint."""
    trainer, saver = Trainer(args, setting.offload), checkpointer(setting, root, args)
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


def settings_of(args: argparse.Namespace) -> list[Setting]:
    """The stall table's rows: every mode under each offload setting, lazy with offload once per
    staging size."""
    rows = []
    for offload in (o == "on" for o in args.offload):
        for mode in args.modes:
            stagings = args.staging_subgroups if offload and mode == "lazy" else [CheckpointConfig().staging_subgroups]
            rows += [Setting(mode, offload, staging) for staging in stagings]
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument("--offload", nargs="+", default=["off"], choices=["off", "on"], help="optimizer offload settings measured")
    parser.add_argument("--subgroup-size", type=int, default=4_000_000, help="offload: elements per subgroup")
    parser.add_argument("--staging-subgroups", type=int, nargs="+", default=[0, 2], help="offload: lazy's checkpoint.staging_subgroups measured")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 keeps a shared machine's noise down)")
    parser.add_argument("--tiny", action="store_true", help="CPU, toy sizes, offload off and on (what the test runs)")
    parser.add_argument("--out", default=None, help="the JSON's path")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
        args.device, args.offload = "cpu", ["off", "on"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.dir or tempfile.mkdtemp(prefix="ebb-bench-checkpoint-"))
    sizing = Trainer(args, "on" in args.offload)
    sizing.step()
    state_gb = sizing.state_bytes() / 1e9
    resident_gb = sum(t.numel() * t.element_size() for t in getattr(sizing.optimizer, "host_resident", ())[1:]) / 1e9
    header = sizing.header()
    del sizing
    gc.collect()
    rows = settings_of(args)
    stalls, flushes = {}, {}
    for setting in rows:
        shutil.rmtree(work / "stall", ignore_errors=True)
        (work / "stall").mkdir(parents=True)
        stall, flush = measure_stalls(setting, work / "stall", args)
        stalls[setting.label], flushes[setting.label] = statistics.median(stall), statistics.median(flush)
        gc.collect()  # trainer and checkpointer hold each other through hooks: free their GBs first
        print(f"  {setting.label}: stalls {' '.join(f'{t:.3f}' for t in stall)} s, commits {' '.join(f'{t:.2f}' for t in flush)}", file=sys.stderr, flush=True)
    shutil.rmtree(work / "stall", ignore_errors=True)
    lazy_rows = [r for r in rows if r.mode == "lazy"] or [Setting("lazy", o == "on") for o in args.offload]
    e2e = {}
    for row in lazy_rows:
        e2e[row.label] = end_to_end(row, work / "e2e" / row.label.replace(" ", "-"), args)
        gc.collect()
    shutil.rmtree(work, ignore_errors=True)

    print(f"checkpoint stall per save, {args.device}, model + AdamW state {state_gb:.2f} GB")
    if header:
        print(f"  with offload, {resident_gb:.2f} GB of it (the moments) are written in place from the host buffers; {header}")
    lazy_stall = stalls.get("lazy")
    print(f"{'mode':<28}{'stall vs lazy':>14}{'stall':>10}{'commit':>10}{'stall / commit':>16}")
    for label, stall in stalls.items():
        versus = f"{stall / lazy_stall:.1f}x" if lazy_stall else "-"
        print(f"{label:<28}{versus:>14}{stall:>9.3f}s{flushes[label]:>9.2f}s{stall / flushes[label]:>16.3f}")
    ratios, paired = {}, {}
    for label, (plain, checkpointed, first) in e2e.items():
        ratios[label] = ratio = sum(checkpointed) / sum(plain)
        paired[label] = statistics.median(c / p for p, c in zip(plain, checkpointed))
        step_s = sum(plain) / (args.interval * len(plain))
        print(
            f"end to end, {label}: every {args.interval} steps ({args.interval * step_s:.1f} s of training at {step_s:.3f} s/step)"
            f" / no checkpoints = {ratio:.3f} ({len(plain)} intervals of each; median of each checkpointed one / the plain one before it {paired[label]:.3f})"
        )
        print(
            f"  training time lost per checkpoint: {(sum(checkpointed) - sum(plain)) / len(checkpointed):.2f} s;"
            f" the first checkpoint of a run (allocating its host buffers), untimed above: {first:.2f} s"
        )
        relative = {k: " ".join(f"{t * len(plain) / sum(plain):.2f}" for t in v) for k, v in {"none": plain, "lazy": checkpointed}.items()}
        print("  each interval / the mean plain one: " + ", ".join(f"{k} {v}" for k, v in relative.items()))
    name = f"checkpoint-{args.device}-seq{args.seq_len}-threads{torch.get_num_threads()}.json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "args": vars(args), "model_state_gb": state_gb, "offloaded_moments_gb": resident_gb, "offload_header": header,
        "stall_s": stalls, "flush_s": flushes, "stall_vs_commit": {k: stalls[k] / flushes[k] for k in stalls},
        "stall_vs_lazy": {m: s / lazy_stall for m, s in stalls.items()} if lazy_stall else None,
        "e2e_intervals_s": {k: {"none": plain, "lazy": checkpointed} for k, (plain, checkpointed, _) in e2e.items()},
        "first_checkpoint_s": {k: first for k, (_, _, first) in e2e.items()}, "e2e_ratio": ratios, "e2e_paired_median": paired,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
