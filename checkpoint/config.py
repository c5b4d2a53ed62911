"""The `checkpoint` section of a run config: when and how checkpoints are written, how many are kept."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from checkpoint import MODES
from common.config import Strict, one_of

CheckpointMode = Annotated[str, AfterValidator(one_of(MODES, "checkpoint mode"))]


class CheckpointConfig(Strict):
    interval: int = Field(0, ge=0, description="save every N steps; 0 = only at the end")
    mode: CheckpointMode = Field("lazy", description="how a checkpoint is written, by name in checkpoint.MODES (README: Checkpoints and resume)")
    keep_last: int = Field(2, ge=1)
    dir: str | None = Field(None, description="None = <run_dir>/checkpoints")
    save_final: bool = True
    on_error: Literal["warn", "fail"] = Field(
        "fail", description="a checkpoint that cannot be written: fail = stop the run (exit code 2), warn = print and keep training"
    )
    when_busy: Literal["wait", "skip"] = Field(
        "wait", description="a request while the previous checkpoint is still being written: wait for it, or skip this one (logged)"
    )
    on_signal: Literal["save", "exit"] = Field(
        "save", description="SIGTERM or SIGINT: save = finish the step, save a checkpoint of it, then exit; exit = finish the step and exit without one"
    )
    host_buffer_gb: float = Field(64.0, gt=0, description="lazy mode: most host memory per process for staging one checkpoint, in GiB")
    staging_subgroups: int = Field(
        2, ge=0,
        description="lazy mode with optim.offload: subgroups of offloaded state a step may copy aside while the checkpoint still writes them; 0 = it waits",
    )
