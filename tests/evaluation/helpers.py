"""A small checkpoint of every mixer, its `to-hf` export, and the local tasks."""
from __future__ import annotations

from pathlib import Path

from tests.hf.helpers import save_checkpoint, small_config, small_model, to_hf
from tests.mixer_checks import SMALL_MIXERS

TASKS = Path(__file__).parent / "tasks"
TASK_NAMES = ("ebb_mc", "ebb_ppl", "ebb_gen")
MAX_LENGTH = 64  # shorter than the perplexity texts: their loglikelihoods take several windows
PATTERN = "MTG*R"  # the recurrences of every kind (SSD, delta rule, gated delta rule, DPLR) and attention
CHUNKS = {name: {"chunk_size": 16} for name, options in SMALL_MIXERS.items() if "chunk_size" in options}  # several chunks, not dozens


def checkpoint_and_export(root: Path, pattern: str = PATTERN) -> tuple[Path, Path]:
    """A run dir holding a checkpoint of a small `pattern` model, and its remote-code export (fp32)."""
    run = root / "run"
    checkpoint = save_checkpoint(run / "checkpoints", small_model(small_config(pattern, CHUNKS)))
    to_hf(checkpoint, root / "hf", "--dtype", "fp32")
    return run, root / "hf"


def assert_one_error_line(stderr: str, expected: str) -> None:
    """The one-line promise for a command run in this process: one `error:` line naming the cause,
    nothing else but `ebb: ` lines."""
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and all(line.startswith(("error: ", "ebb: ")) for line in lines), stderr[-3000:]
    assert expected in errors[0], errors[0]
