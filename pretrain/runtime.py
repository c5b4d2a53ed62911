"""Process set-up for a run: threads, seeds, device and autocast dtype."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def local_rank() -> int:
    """This process's rank on its node (torchrun sets LOCAL_RANK); it picks the GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def select_device(train_cfg: TrainConfig) -> torch.device:
    if train_cfg.device == "cpu" or (train_cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("config key train.device: cuda was asked for but no CUDA device is available")
    device = torch.device("cuda", local_rank())
    torch.cuda.set_device(device)
    # float32 matmuls (the PyTorch chunked ops compute in float32) on TF32 tensor cores
    torch.set_float32_matmul_precision("high")
    return device


def select_dtype(train_cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA devices that support it, float32 elsewhere."""
    if train_cfg.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, train_cfg.dtype)


def set_up(train_cfg: TrainConfig) -> Runtime:
    """Set threads and seeds (the same seed on every rank: each builds the same full model before
    sharding it), pick the device and dtype."""
    if train_cfg.threads is not None:
        torch.set_num_threads(train_cfg.threads)
    seed_everything(train_cfg.seed)
    device = select_device(train_cfg)
    return Runtime(device, select_dtype(train_cfg, device))
