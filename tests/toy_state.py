"""A toy model, optimizer, LR schedule and data position: what a checkpoint holds, for the
checkpoint tests."""
from __future__ import annotations

import torch

from optim.adamw import build_optimizer
from optim.config import OptimConfig
from optim.schedules import build_lr_schedule


class Position:
    """Stand-in for the data iterator's resumable position."""

    def __init__(self, row: int = 0):
        self.row = row

    def state_dict(self) -> dict[str, int]:
        return {"row": self.row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.row = state["row"]


def make_state(seed: int, device: str = "cpu", **optim):
    """Model, optimizer (`optim`: OptimConfig's keys), LR schedule and data position."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)).to(device)
    optimizer = build_optimizer(model, OptimConfig(**optim))
    schedule = build_lr_schedule(optimizer, 10, **OptimConfig(warmup_steps=2).schedule_options)
    return model, optimizer, schedule, Position()


def train_steps(model, optimizer, schedule, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        loss = model(torch.randn(4, 8).to(model[0].weight.device)).pow(2).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
