"""configs/all_mixers.yaml: a hybrid with every mixer trains through the CLI and its loss falls."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_config_has_every_implemented_mixer():
    from models.mixers import PATTERN

    cfg = load_config(REPO / "configs/all_mixers.yaml")
    assert set(cfg.model.blocks) == set(PATTERN)


@pytest.mark.slow
def test_every_mixer_hybrid_trains_with_falling_loss(tmp_path):
    short = [
        "train.steps=12", "train.seq_len=64", "train.batch_size=4", "train.eval_interval=0", "train.threads=1",
        "optim.warmup_steps=2", "optim.lr=3e-3", "data.embedded_max_bytes=100000", "checkpoint.interval=0",
        "logging.progress=false", "logging.tensorboard=false", f"train.run_dir={tmp_path}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "--config", "configs/all_mixers.yaml", *short],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert all(r["aux_loss"] > 0 for r in records if "loss" in r)  # MoM and SSE add theirs


def test_every_mixer_trains_under_bf16_autocast():
    """The chunked ops leave autocast (they compute in float32): under bf16 autocast every mixer's
    forward and backward run (RWKV-7's WY solve has no bf16 kernel) and the ops' outputs are the
    float32 ones."""
    import torch

    from models.model import HybridLM

    cfg = load_config(REPO / "configs/all_mixers.yaml")
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_chunked_ops_ignore_autocast():
    import torch
    import torch.nn.functional as F

    import models.ops as ops

    torch.manual_seed(0)
    q, v = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    k, kappa = F.normalize(torch.randn(1, 40, 2, 16), dim=-1), F.normalize(torch.randn(1, 40, 2, 16), dim=-1)
    g, beta, w = F.logsigmoid(torch.randn(1, 40, 2)), torch.rand(1, 40, 2), -0.6 * torch.rand(1, 40, 2, 16)
    calls = {
        "simple_gla": lambda: ops.chunk_simple_gla(q, k, v, g, chunk_size=16),
        "delta_rule": lambda: ops.chunk_delta_rule(q, k, v, beta, chunk_size=16),
        "gated_delta_rule": lambda: ops.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16),
        "rwkv7": lambda: ops.chunk_rwkv7(q, w, k, v, -kappa, kappa * 0.5, chunk_size=16),
    }
    for name, call in calls.items():
        expected, _ = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = call()
        assert torch.equal(got, expected), name
