"""Learning-rate schedules as multipliers of the peak lr, wrapped in a `LambdaLR`.

Convention shared by every schedule: step `s` counts optimizer steps from 0; warmup ramps
linearly to 1 at `s = warmup_steps - 1`; a decay runs from its start to `min_lr_ratio`, reached
exactly at the final step `s = total_steps - 1` and held after it.

- cosine: warmup, then a half cosine from 1 to `min_lr_ratio` over the remaining steps.
- wsd (warmup-stable-decay): warmup, constant 1, then a "1-sqrt" decay
  (f = 1 - sqrt(progress), Hägele et al. 2024, which beats linear decay at equal cost) over the
  last `decay_fraction` of the steps. A run stopped at the end of the stable phase can be
  continued or branched into a decay without replaying anything.
- constant: warmup, then 1.

`LR_SCHEDULES` maps each `optim.schedule` name to its multiplier.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _decay_progress(step: int, decay_start: int, total_steps: int) -> float:
    """0 before `decay_start`, rising to 1 at the final step `total_steps - 1`."""
    if step < decay_start:
        return 0.0
    return min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))


def constant_factor(step: int, warmup_steps: int) -> float:
    return _warmup(step, warmup_steps)


def cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = _decay_progress(step, warmup_steps, total_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd_decay_start(warmup_steps: int, total_steps: int, decay_fraction: float) -> int:
    decay_steps = max(1, round(decay_fraction * total_steps))
    return max(warmup_steps, total_steps - decay_steps)


def wsd_factor(step: int, warmup_steps: int, total_steps: int, decay_fraction: float, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = _decay_progress(step, wsd_decay_start(warmup_steps, total_steps, decay_fraction), total_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * (1 - math.sqrt(progress))


LrFactor = Callable[..., float]  # (step, total_steps, warmup_steps, min_lr_ratio, decay_fraction) -> multiplier

LR_SCHEDULES: dict[str, LrFactor] = {
    "cosine": lambda step, total, warmup_steps, min_lr_ratio, decay_fraction: cosine_factor(step, warmup_steps, total, min_lr_ratio),
    "wsd": lambda step, total, warmup_steps, min_lr_ratio, decay_fraction: wsd_factor(step, warmup_steps, total, decay_fraction, min_lr_ratio),
    "constant": lambda step, total, warmup_steps, min_lr_ratio, decay_fraction: constant_factor(step, warmup_steps),
}


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int, min_lr_ratio: float, decay_fraction: float) -> float:
    """The multiplier of the peak lr at optimizer step `step` (0-based); the keywords are
    `OptimConfig.schedule_options`."""
    return LR_SCHEDULES[schedule](step, total_steps, warmup_steps, min_lr_ratio, decay_fraction)


def build_lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, **schedule_options: float | int | str) -> LambdaLR:
    """`schedule_options`: `OptimConfig.schedule_options` (schedule, warmup_steps, min_lr_ratio, decay_fraction)."""
    return LambdaLR(optimizer, functools.partial(lr_factor, total_steps=total_steps, **schedule_options))
