"""Per-step metrics to metrics.jsonl, TensorBoard, wandb and progress on the console: a tqdm bar
on a terminal, plain lines otherwise (under torchrun every rank's output is a file that torchrun
relays line by line, where a bar's carriage returns would pile up into one garbled line).

metrics.jsonl is strict JSON, one object per line: a value that is not finite (a diverged step's
loss) is written as null."""
from __future__ import annotations

import json
import math
import os
import resource
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pretrain.config import ConfigError, LoggingConfig
from pretrain.errors import RunError

TRAIN_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mb")
EVAL_FIELDS = ("eval_loss", "eval_ppl")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or on CPU the process's maximum resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 2**10


class Throughput:
    """Tokens/s and MFU over the training time accumulated since the last `take()`."""

    def __init__(self, tokens_per_step: int, train_flops_per_token: float, peak_flops: float | None):
        self.tokens_per_step = tokens_per_step
        self.train_flops_per_token = train_flops_per_token
        self.peak_flops = peak_flops
        self._steps, self._seconds = 0, 0.0

    def add_step(self, seconds: float) -> None:
        self._steps += 1
        self._seconds += seconds

    def take(self) -> tuple[float, float | None]:
        tokens_per_s = self._steps * self.tokens_per_step / max(self._seconds, 1e-9)
        self._steps, self._seconds = 0, 0.0
        mfu = None if self.peak_flops is None else tokens_per_s * self.train_flops_per_token / self.peak_flops
        return tokens_per_s, mfu


def _wandb_mode(cfg: LoggingConfig) -> str:
    """auto: WANDB_MODE when set, else online if the wandb API answers within 2 s, else offline."""
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=2).close()
        return "online"
    except OSError:
        return "offline"


def _start_wandb(cfg: LoggingConfig, run_dir: Path, run_config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.wandb is true but wandb is not installed (pip install -e .[wandb])") from None
    return wandb.init(project=cfg.wandb_project, name=run_dir.name, dir=str(run_dir), config=run_config, mode=_wandb_mode(cfg))


def _tensorboard_tag(key: str) -> str:
    if key.startswith("downstream/"):  # downstream/<task>/<metric>: grouped by task already
        return key
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def strict(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with every non-finite float as None (JSON has no NaN or Infinity)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line cut short (the process was killed while
    writing it) is dropped with a warning; any other line that is not a JSON object is a
    RunError naming it, since dropping it would lose a record."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["step"]
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                print(f"ebb: warning: {path}: dropped its last line, cut short by an interrupted write", file=sys.stderr, flush=True)
                continue
            raise RunError(f"{path} line {number} is not a metrics record; fix or move the file") from None
        records.append(record)
    return records


class Progress:
    """Steps done, with the latest loss: a tqdm bar on a terminal, else a plain line every
    twentieth of the run (and at its end)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.every = max(1, total // 20)
        self.next_line = start + self.every
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True) if enabled and sys.stderr.isatty() else None

    def update(self, record: dict[str, Any]) -> None:
        step, summary = record["step"], _summary(record)
        if self.bar is not None:
            if summary:
                self.bar.set_postfix(summary, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.enabled and summary and (step >= self.next_line or step == self.total):
            self.next_line = step + self.every
            print(f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in summary.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary(record: dict[str, Any]) -> dict[str, str]:
    if "loss" not in record:
        return {}
    shown = {"loss": "{:.4f}", "lr": "{:.2e}", "tokens_per_s": "{:.0f}"}
    names = {"tokens_per_s": "tok/s"}
    return {names.get(k, k): ("nan" if record[k] is None else fmt.format(record[k])) for k, fmt in shown.items() if k in record}


class MetricsLogger:
    """One record per logged step, to every enabled sink. On resume, records after the resumed
    step (from the interrupted run) are dropped from metrics.jsonl so each step appears once."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, total_steps: int, start_step: int, run_config: dict[str, Any]):
        self._wandb = _start_wandb(cfg, run_dir, run_config) if cfg.wandb else None
        self.path = run_dir / "metrics.jsonl"
        self._keep_records_up_to(start_step)
        self._file = self.path.open("a")
        self._tensorboard = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when enabled

            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._progress = Progress(total_steps, start_step, cfg.progress)

    def _keep_records_up_to(self, step: int) -> None:
        """Rewritten through a temporary file and a rename, so a crash meanwhile loses nothing."""
        if not self.path.exists():
            return
        kept = [json.dumps(r) for r in read_records(self.path) if r["step"] <= step]
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text("".join(line + "\n" for line in kept))
        os.replace(partial, self.path)

    def log(self, record: dict[str, Any]) -> None:
        record = strict(record)
        step = record["step"]
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(_tensorboard_tag(key), value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        self._progress.update(record)

    def close(self) -> None:
        self._progress.close()
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
