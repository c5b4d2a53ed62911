import math

import pytest
import torch

from optim.adamw import build_optimizer
from optim.config import OptimConfig
from optim.schedules import build_lr_schedule, cosine_factor, lr_factor, wsd_decay_start, wsd_factor


def test_warmup_is_linear_and_reaches_peak_on_its_last_step():
    factors = [cosine_factor(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(4)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_is_monotone_and_ends_at_min_lr_on_the_final_step():
    total = 50
    factors = [cosine_factor(s, 5, total, 0.1) for s in range(total + 5)]
    after_warmup = factors[4:total]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))
    assert factors[total - 1] == pytest.approx(0.1)
    assert factors[total + 4] == pytest.approx(0.1)
    # in between it follows the half cosine: step 27 is 23 of the 45 decay steps
    assert cosine_factor(5 + 22, 5, 50, 0.1) == pytest.approx(0.55 + 0.45 * math.cos(math.pi * 23 / 45))


def test_wsd_phases():
    total, warmup = 100, 10
    start = wsd_decay_start(warmup, total, decay_fraction=0.2)
    assert start == 80
    f = [wsd_factor(s, warmup, total, 0.2, 0.0) for s in range(total)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert f[warmup:start] == pytest.approx([1.0] * (start - warmup))
    decay = f[start:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[0] == pytest.approx(1 - math.sqrt(1 / 20))
    assert decay[-1] == pytest.approx(0.0)


def test_constant_after_warmup():
    cfg = OptimConfig(schedule="constant", warmup_steps=3)
    assert [lr_factor(s, 10, **cfg.schedule_options) for s in range(6)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])


def test_lambda_lr_drives_the_optimizer_lr_step_by_step():
    cfg = OptimConfig(lr=1e-3, schedule="wsd", warmup_steps=2, decay_fraction=0.5, min_lr_ratio=0.1)
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, cfg)
    schedule = build_lr_schedule(optimizer, 6, **cfg.schedule_options)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([1e-3 * lr_factor(s, 6, **cfg.schedule_options) for s in range(6)])
    assert seen[-1] == pytest.approx(1e-4)


def test_param_groups_split_decay_from_norms_biases_and_marked():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(8, 4))
    model[2].weight._no_weight_decay = True
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1, fused=None))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p is model[0].weight for p in decay["params"]] == [True]
    assert len(no_decay["params"]) == 4
    assert decay["fused"] is True  # CPU fused AdamW exists in every torch ebb supports
