"""Training runs the tests start, in process (`pretrain.train.train`) or as subprocesses, and what
they log."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from pretrain.config import RunConfig, load_config
from tests.conftest import TP2_MIXERS, tiny_model_overrides

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module, for tests that call its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered as an import would be (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module

def run_bench(name: str, *args: str, out: Path, timeout: int = 600) -> tuple[dict, str]:
    """bench/<name>.py run as a user runs it (from the repo root), writing its JSON to `out`: the
    report and what it printed; a failed run fails the test with the end of its stderr."""
    done = subprocess.run([sys.executable, f"bench/{name}.py", *args, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


# A tiny MTG* run with evaluation and checkpoints, as the command line takes it
SMALL_RUN = [
    *tiny_model_overrides("MTG*", vocab_size=320),
    "data.embedded_max_bytes=100000", "train.threads=1", "train.steps=6", "train.seq_len=32",
    "train.batch_size=2", "train.grad_accum=2", "train.eval_interval=3", "train.eval_batches=2",
    "optim.warmup_steps=2", "checkpoint.interval=2", "checkpoint.keep_last=2", "logging.progress=false",
]

# Every mixer, tp 2 divides it, for runs compared across layouts (the pattern comes with each
# run). The aux losses are per-rank batch statistics under dp, so one process cannot match them:
# off here (tests/parallel/test_pipeline.py and test_fsdp.py check that they cross stages and
# survive FSDP).
LAYOUT_RUN = [
    *tiny_model_overrides(
        vocab_size=320, mlp_hidden=64, tie_embeddings=False,
        mixers=TP2_MIXERS | {"mom": {"aux_loss_scale": 0}, "sse": {"aux_loss_scale": 0}},
    ),
    "data.embedded_max_bytes=30000", "train.threads=1", "train.steps=3", "train.seq_len=16",
    "train.eval_interval=0", "train.dtype=float32", "train.device=cpu", "train.grad_clip=0.5",
    "optim.lr=3e-3", "optim.warmup_steps=1", "optim.fused=false", "logging.progress=false", "logging.tensorboard=false",
]


def layout_config(run_dir: Path, *overrides: str) -> RunConfig:
    return load_config(None, [*LAYOUT_RUN, f"train.run_dir={run_dir}", *overrides])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path, key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in records(run_dir) if key in r])


def cli(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def assert_one_error(result: subprocess.CompletedProcess, expected: str, status: int = 2) -> str:
    """The project's promise for a fault: exit `status`, and on stderr one `error:` line naming the
    cause (`expected` in it), nothing else but `ebb: ` lines (warnings, notes); the error line."""
    lines = result.stderr.splitlines()
    assert result.returncode == status, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and all(line.startswith(("error: ", "ebb: ")) for line in lines), result.stderr[-3000:]
    assert expected in errors[0], errors[0]
    return errors[0]


def strict_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON (NaN and Infinity refused)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"metrics.jsonl holds {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
