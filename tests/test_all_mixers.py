"""configs/all_mixers.yaml: a hybrid with every mixer trains through the CLI and its loss falls."""
import json
import subprocess
import sys
from pathlib import Path

from pretrain.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_config_has_every_implemented_mixer():
    from models.config import IMPLEMENTED_MIXERS

    cfg = load_config(REPO / "configs/all_mixers.yaml")
    assert set(cfg.model.blocks) == set(IMPLEMENTED_MIXERS)


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
