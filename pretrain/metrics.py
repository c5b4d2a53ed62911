"""Per-step metrics to metrics.jsonl, TensorBoard, wandb and a tqdm progress bar."""
from __future__ import annotations

import json
import os
import resource
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pretrain.config import ConfigError, LoggingConfig

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
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


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
        self._progress = tqdm(total=total_steps, initial=start_step, unit="step", disable=not cfg.progress, dynamic_ncols=True)

    def _keep_records_up_to(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and v is not None}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(_tensorboard_tag(key), value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if "loss" in record:
            self._progress.set_postfix({"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}, refresh=False)
        self._progress.update(step - self._progress.n)

    def close(self) -> None:
        self._progress.close()
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
