"""Tensor parallelism: DTensor `parallelize_module` styles that shard every mixer by head, the
MLPs by hidden unit and the vocabulary (embedding and head, with loss-parallel cross-entropy),
optionally with sequence-parallel norms (Megatron-style SP).

Every mixer and MLP declares how it splits as data, a `TensorParallelPlan` (models/spec.py);
`layer_styles` turns that vocabulary into styles, so no mixer knows about torch.distributed.
Inside a mixer the per-head projections are colwise (local outputs), so mixers run on plain
tensors holding this rank's heads; the projection back to the residual stream is rowwise.
Mixers and MLPs receive the replicated residual stream as a plain tensor (gathered first under
SP), so routers and token shifts run on it unchanged."""
from __future__ import annotations

from collections import defaultdict
from fnmatch import fnmatchcase

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

from models.spec import TensorParallelPlan
from parallel.tp.styles import LocalParameters, ReplicatedRouter


def layer_styles(layer: nn.Module, activations: Placement) -> list[tuple[nn.Module, ParallelStyle]]:
    """The styles `layer.tp_plan` asks for, on the modules of `layer` they name. Raises
    NotImplementedError for a layer without a plan, ValueError for one whose plan misses a
    parameter."""
    plan: TensorParallelPlan | None = getattr(layer, "tp_plan", None)
    if plan is None:
        raise NotImplementedError(f"{type(layer).__name__} declares no tensor-parallel plan (tp_plan); use parallel.tp=1")
    modules = dict(layer.named_modules())

    def named(patterns: tuple[str, ...]) -> list[str]:
        return [name for name in modules if any(fnmatchcase(name, p) for p in patterns)]

    styles: list[tuple[nn.Module, ParallelStyle]] = [(modules[n], ColwiseParallel()) for n in named(plan.colwise)]
    styles += [(modules[n], ReplicatedRouter()) for n in named(plan.routers)]
    local: dict[str, dict[str, tuple[str, ...]]] = defaultdict(dict)
    for kind, entries in (("sharded", plan.sharded), ("replicated", plan.replicated), ("summed", plan.summed)):
        for pattern, params in entries.items():
            for name in named((pattern,)):
                local[name][kind] = local[name].get(kind, ()) + params
    styles += [(modules[name], LocalParameters(**kinds)) for name, kinds in local.items()]
    styles += [(modules[n], RowwiseParallel(output_layouts=activations)) for n in named(plan.rowwise)]
    _check_covered(layer, styles)
    return styles


def _check_covered(layer: nn.Module, styles: list[tuple[nn.Module, ParallelStyle]]) -> None:
    """Every parameter of `layer` must be placed by exactly one style."""
    placed: list[int] = []
    for module, style in styles:
        if isinstance(style, LocalParameters):
            names = (*style.sharded, *style.replicated, *style.summed)
            placed += [id(p) for n, p in module.named_parameters(recurse=False) if n in names]
        else:
            placed += [id(p) for p in module.parameters()]
    missing = [n for n, p in layer.named_parameters() if id(p) not in placed]
    if missing or len(placed) != len(set(placed)):
        problem = f"does not place {', '.join(missing)}" if missing else "places a parameter twice"
        raise ValueError(f"{type(layer).__name__}'s tensor-parallel plan {problem}")


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
    styles: list[tuple[nn.Module | None, ParallelStyle]] = [
        (block.mixer_norm, _norm_style(sequence_parallel)), *layer_styles(mixer, activations)
    ]
    if mlp is not None:
        styles += [(block.mlp_norm, _norm_style(sequence_parallel)), *layer_styles(mlp, activations)]
    if sequence_parallel:  # gather the tokens before each branch; its rowwise output scatters them again
        gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
        styles += [(mixer, gather), (mlp, gather)]
    _apply_styles(tp_mesh, styles)
