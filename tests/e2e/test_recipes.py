"""configs/recipes/: every recipe is a run at a real size that dry-runs at the world size it names,
without its tokenizer or its hub dataset (neither is on this machine, and neither is read).

The activation part of the memory estimate (one forward and backward on the meta device) takes
minutes per recipe on 2 CPU cores, so here it is left out; the README's table has the full dry
run's figures."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import pretrain.dry_run
from pretrain.config import load_config
from pretrain.dry_run import describe_run

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"
# name: (GPUs it is laid out for, parameters between)
SIZES = {
    "gdn-340m": (8, 0.3e9, 0.4e9),
    "gdn-1.3b": (8, 1.2e9, 1.5e9),
    "gdn-hybrid-1.3b": (16, 1.2e9, 1.5e9),
    "mamba2-hybrid-1.3b": (8, 1.2e9, 1.5e9),
    "rwkv7-1.5b": (8, 1.4e9, 1.7e9),
    "gdn-hybrid-7b": (64, 6.5e9, 7.5e9),
}
GPU_MEMORY_GIB = 80


def test_every_recipe_is_checked() -> None:
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(SIZES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SIZES))
def test_recipe_dry_runs_at_its_world_size(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world, low, high = SIZES[name]
    cfg = load_config(RECIPES / f"{name}.yaml", [f"train.run_dir={tmp_path / 'run'}"])
    source = (cfg.data.sources or [None])[0]
    assert source is not None and source.path.startswith("hf:") and source.streaming
    assert not Path(cfg.data.tokenizer).exists() and cfg.data.tokenizer != "byte"  # a real tokenizer, which the dry run must not read
    assert cfg.train.seq_len >= 4096 and cfg.train.dtype == "bfloat16" and cfg.train.device == "cuda"
    assert cfg.checkpoint.mode == "lazy" and cfg.evaluation.tasks and cfg.parallel.pp == 1

    monkeypatch.setattr(pretrain.dry_run, "activation_bytes", lambda *args, **kwargs: 0)
    report = describe_run(cfg, world)
    total = re.search(r"^  total +([\d.]+)([MB])$", report, re.MULTILINE)
    params = float(total.group(1)) * (1e9 if total.group(2) == "B" else 1e6)
    assert low <= params <= high, report
    held = re.search(r"^  total +([\d.]+) MiB", report.split("memory estimate", 1)[1], re.MULTILINE)
    assert float(held.group(1)) < GPU_MEMORY_GIB * 1024, report
    with pytest.raises(Exception, match="world size"):
        describe_run(cfg, world // 2)
