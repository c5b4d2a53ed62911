"""Tensor parallelism: DTensor `parallelize_module` plans that shard every mixer by head, the
SwiGLU MLP by hidden unit and the vocabulary (embedding and head, with loss-parallel
cross-entropy), optionally with sequence-parallel norms (Megatron-style SP).

Each mixer brings its own plan and divisibility rule (`TP_PLANS`, keyed by pattern character);
a mixer without one is rejected by `validate_layout` and `apply_tensor_parallel`. Inside a mixer
the projections are colwise (local outputs), so mixers run on plain tensors holding this rank's
heads; every mixer's `out_proj` is rowwise. Mixers and MLPs receive the replicated residual
stream as a plain tensor (gathered first under SP), so routers and token shifts run on it
unchanged."""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from models.config import ModelConfig
from models.mixers.rwkv7 import RWKV7ChannelMix
from parallel.tp import attention, delta_rule, mamba2, routed, rwkv7
from parallel.tp.styles import LocalParameters


class MixerPlan(NamedTuple):
    plan: Callable[[nn.Module], dict[str, ParallelStyle]]  # styles for the mixer's inside, out_proj excluded
    divisibility_error: Callable[[ModelConfig, int], str | None]  # why tp cannot split this config, or None


TP_PLANS: dict[str, MixerPlan] = {
    "*": MixerPlan(attention.plan, attention.divisibility_error),
    "M": MixerPlan(mamba2.plan, mamba2.divisibility_error),
    "T": MixerPlan(delta_rule.plan, delta_rule.deltanet_divisibility_error),
    "G": MixerPlan(delta_rule.plan, delta_rule.gated_deltanet_divisibility_error),
    "R": MixerPlan(rwkv7.plan, rwkv7.divisibility_error),
    "O": MixerPlan(routed.mom_plan, routed.mom_divisibility_error),
    "S": MixerPlan(routed.sse_plan, routed.sse_divisibility_error),
}


def mixer_plan(kind: str) -> MixerPlan:
    if kind not in TP_PLANS:
        raise NotImplementedError(
            f"mixer {kind!r} has no tensor-parallel plan (covered: {', '.join(TP_PLANS)}); use parallel.tp=1"
        )
    return TP_PLANS[kind]


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False, loss_parallel: bool = True
) -> nn.Module:
    """Shard a HybridLM, or a pipeline stage of one (the parts it lacks are skipped), in place
    over the 1-D `tp_mesh`; every parameter becomes a DTensor.

    With `loss_parallel` the logits stay a DTensor sharded on the vocabulary (Shard(-1)): compute
    the cross-entropy and its backward inside `torch.distributed.tensor.parallel.loss_parallel()`.
    Otherwise they are gathered into a plain tensor. With `sequence_parallel` the residual
    stream between blocks is split over the sequence and the norms run on the local tokens."""
    activations: Placement = Shard(1) if sequence_parallel else Replicate()
    blocks = model.blocks.values() if isinstance(model.blocks, nn.ModuleDict) else model.blocks
    for block in blocks:
        _parallelize_block(block, tp_mesh, sequence_parallel, activations)
    tied = model.embed is not None and model.lm_head is not None and model.lm_head.weight is model.embed.weight
    _apply_styles(tp_mesh, [
        (model.embed, RowwiseParallel(input_layouts=Replicate(), output_layouts=activations)),
        (model.norm, _norm_style(sequence_parallel)),
        (model.lm_head, ColwiseParallel(
            input_layouts=activations,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )),
    ])
    if tied:
        model.lm_head.weight = model.embed.weight  # both Shard(0) over the vocabulary
    return model


def _norm_style(sequence_parallel: bool) -> ParallelStyle:
    """Block and final RMSNorms: on the local tokens with SP; otherwise replicated, on the
    replicated residual stream."""
    return SequenceParallel() if sequence_parallel else LocalParameters(replicated=("weight",))


def _apply_styles(tp_mesh: DeviceMesh, styles: list[tuple[nn.Module | None, ParallelStyle]]) -> None:
    """Styles applied to modules reached as attributes rather than by name: attribute access sees
    through activation-checkpoint wrappers, so TP may be applied before or after them."""
    for module, style in styles:
        if module is not None:
            parallelize_module(module, tp_mesh, style)


def _parallelize_block(block: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, activations: Placement) -> None:
    mixer, mlp = block.mixer, block.mlp
    parallelize_module(mixer, tp_mesh, mixer_plan(block.kind).plan(mixer))
    styles: list[tuple[nn.Module | None, ParallelStyle]] = [
        (block.mixer_norm, _norm_style(sequence_parallel)),
        (mixer.out_proj, RowwiseParallel(output_layouts=activations)),
    ]
    if mlp is not None:
        styles += [(block.mlp_norm, _norm_style(sequence_parallel)), *_mlp_styles(mlp, activations)]
    if sequence_parallel:  # gather the tokens before each branch; its rowwise output scatters them again
        gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
        styles += [(mixer, gather), (mlp, gather)]
    _apply_styles(tp_mesh, styles)


def _mlp_styles(mlp: nn.Module, activations: Placement) -> list[tuple[nn.Module | None, ParallelStyle]]:
    """SwiGLU (gate and up colwise) or RWKV's channel-mix (up colwise; its token-shift mix mu_k
    acts on the model width: replicated); down rowwise."""
    styles: list[tuple[nn.Module | None, ParallelStyle]] = [
        (getattr(mlp, "gate_proj", None), ColwiseParallel()),
        (mlp.up_proj, ColwiseParallel()),
        (mlp.down_proj, RowwiseParallel(output_layouts=activations)),
    ]
    if isinstance(mlp, RWKV7ChannelMix):
        styles.append((mlp, LocalParameters(replicated=("mu_k",))))
    return styles
