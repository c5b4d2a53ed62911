"""The `parallel` section of a run config, and the activation-checkpointing choice of `train`."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from common.config import Strict, one_of
from models.config import ModelConfig
from parallel.context_parallel import check_context_parallel
from parallel.data_parallel import ACTIVATION_CHECKPOINTING
from parallel.pipeline import PIPELINE_SCHEDULES, runs_several_stages

PipelineSchedule = Annotated[str, AfterValidator(one_of(PIPELINE_SCHEDULES, "pipeline schedule"))]
ActivationCheckpointing = Annotated[str, AfterValidator(one_of(ACTIVATION_CHECKPOINTING, "activation checkpointing mode"))]


class ParallelConfig(Strict):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    dp_shard: int = Field(-1, ge=-1)
    dp_replicate: int = Field(1, ge=1)
    cp: int = Field(1, ge=1, description="context parallelism: ranks each sequence is cut over, one contiguous piece on each")
    pp_schedule: PipelineSchedule = Field("1f1b", description="torch.distributed.pipelining schedule, by name in parallel.pipeline.PIPELINE_SCHEDULES")
    pp_virtual_stages: int = Field(1, ge=1, description="pipeline stages per pp rank; > 1 for the interleaved schedules")
    pp_microbatches: int | None = Field(None, ge=1, description="microbatches each train.batch_size batch is split into; None = pp")
    fsdp_reshard_after_forward: bool = Field(True, description="free gathered parameters after forward, gather again in backward")
    sequence_parallel: bool = Field(False, description="with tp > 1: norms and residuals sharded over the sequence")
    collective_timeout_s: float = Field(
        600.0, gt=0, description="seconds a rank waits in a collective for a peer that is gone or hung before it stops (torch's default: 30 min on gloo)"
    )

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches or self.pp

    @model_validator(mode="after")
    def _virtual_stages_fit_schedule(self) -> "ParallelConfig":
        interleaved = runs_several_stages(self.pp_schedule)
        if interleaved and self.pp_virtual_stages < 2:
            raise ValueError(f"pp_schedule {self.pp_schedule} needs pp_virtual_stages >= 2 (stages per pp rank)")
        if not interleaved and self.pp_virtual_stages != 1:
            raise ValueError(f"pp_schedule {self.pp_schedule} runs one stage per rank: set pp_virtual_stages=1 or an interleaved schedule")
        if self.sequence_parallel and (self.tp == 1 or self.pp > 1 or self.cp > 1):
            raise ValueError("sequence_parallel needs tp > 1 and is not supported with pp > 1 or cp > 1 yet")
        return self


def check_context_pieces(model: ModelConfig, cp: int, tokens: int, what: str) -> None:
    """Under context parallelism each rank holds `tokens / cp` consecutive tokens of every row
    (`tokens`: the row length, named `what`). Required, as a ValueError naming the key: cp divides
    the row; every piece is whole chunks of each chunked mixer (a rank's op runs without a padded
    chunk, as fla's context-parallel kernels need); and what `check_context_parallel` asks of the
    mixers' plans (a piece no shorter than the halo a mixer reads before it, no MoM capacity)."""
    if tokens % cp:
        raise ValueError(f"parallel.cp ({cp}) must divide {what} ({tokens}): every rank holds an equal piece of each row")
    piece = tokens // cp
    for name in dict.fromkeys(model.mixer_names):
        chunk = getattr(model.mixer_config(name), "chunk_size", None)
        if chunk is not None and piece % chunk:
            raise ValueError(
                f"parallel.cp ({cp}) cuts {what} ({tokens}) into pieces of {piece} tokens, not whole chunks of "
                f"model.mixers.{name}.chunk_size ({chunk}): each piece must be a multiple of it"
            )
    check_context_parallel(model, tokens, cp)
