"""The `optim` section of a run config: AdamW's hyperparameters, the codec of its moments, the
learning-rate schedule, and per-parameter-group overrides."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from common.config import Strict, one_of
from optim.codecs import CODECS
from optim.offload.host import HOST_CHOICES
from optim.schedules import LR_SCHEDULES

StateDtype = Annotated[str, AfterValidator(one_of(CODECS, "state dtype"))]
LrSchedule = Annotated[str, AfterValidator(one_of(LR_SCHEDULES, "lr schedule"))]
HostOptimizer = Annotated[str, AfterValidator(one_of(HOST_CHOICES, "host optimizer"))]


class ParamGroupOverride(Strict):
    params: str = Field(..., description="glob on parameter names, e.g. '*.w0' or 'blocks.0.*'")
    state_dtype: StateDtype | None = Field(None, description="this group's optimizer-state dtype; None = optim.state_dtype")
    lr_scale: float = Field(1.0, gt=0, description="multiplies the scheduled lr for these parameters")
    weight_decay: float | None = Field(None, ge=0, description="None = optim.weight_decay (exclusions still apply)")


class OffloadConfig(Strict):
    """Interleaved optimizer offload (README: Optimizer offload): fp32 master weights and AdamW's
    fp32 moments live in host memory, cut into subgroups; every `gpu_every_k`-th subgroup is
    updated on the accelerator (its state streamed in and back), the others on the host. Low-bit
    states (`state_dtype` int8, fp8, bf16) stay on the accelerator."""

    enabled: bool = False
    subgroup_size: int = Field(50_000_000, gt=0, description="parameter elements (of this rank's shards) per subgroup")
    gpu_every_k: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto", description="subgroup x goes to the accelerator when x % k == k - 1; 0 = all on the host; auto = the performance model's k"
    )
    host_optimizer: HostOptimizer = Field(
        "auto", description="the host-side AdamW: torch (fused CPU kernel), deepspeed (its CPU Adam), or auto = the faster, measured"
    )
    device_memory_gb: float | None = Field(
        None, gt=0, description="device memory the subgroup staging buffers may take; None = what is free at start-up"
    )


class OptimConfig(Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    schedule: LrSchedule = Field("cosine", description="the lr multiplier after warmup, by name in optim.schedules.LR_SCHEDULES")
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: fraction of steps spent decaying")
    fused: bool | None = Field(None, description="torch fused AdamW for fp32 states; None = where available")
    state_dtype: StateDtype = Field("fp32", description="the codec of Adam's moments, by name in optim.codecs.CODECS (README: Optimizer states)")
    min_quant_numel: int = Field(4096, ge=0, description="tensors with fewer elements keep fp32 states")
    fp32_embedding_states: bool = Field(
        False, description="embedding tables keep fp32 states (half of bitsandbytes' StableEmbedding advice); off: 6 more bytes per embedding entry"
    )
    master_weights: bool = Field(False, description="keep an fp32 master copy in the optimizer state for non-fp32 parameters")
    compile: bool | None = Field(
        None, description="torch.compile the step of non-fp32 states (one graph per codec and dtypes); None = on CPU and CUDA once they hold 1M+ elements"
    )
    overrides: list[ParamGroupOverride] = Field(
        [], description="per-parameter-group settings, first matching glob wins: state_dtype, lr_scale, weight_decay"
    )
    offload: OffloadConfig = OffloadConfig()

    @property
    def schedule_options(self) -> dict[str, float | int | str]:
        """The keywords of `optim.schedules.build_lr_schedule` and `lr_factor`."""
        return dict(schedule=self.schedule, warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio, decay_fraction=self.decay_fraction)
