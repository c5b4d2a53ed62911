"""The device mesh (pp, dp_replicate, dp_shard, cp, tp) and the layout checks run before any work.

`cp` (context parallelism: each rank of a cp group holds one contiguous piece of every sequence)
sits between dp_shard and tp, as in torchtitan: the ranks of a cp group read the same batch, like
tp ranks, but hold different tokens, so their gradients are partial sums that FSDP reduces over
`dp_shard x cp` (the flattened dim `dp_shard_cp`, made once by `build_mesh`).
"""
from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from models.config import ModelConfig
from models.mixers import SPECS
from parallel.config import ParallelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
DP_SHARD_CP = "dp_shard_cp"  # the flattened (dp_shard, cp) dim that FSDP shards over


class ParallelError(ValueError):
    """A parallel layout that cannot run: raised before any process group or model is built."""


def mesh_shape(parallel: ParallelConfig, world_size: int) -> dict[str, int]:
    """Size of every mesh dim, in mesh order; dp_shard = -1 takes the rest of the world size."""
    fixed = parallel.pp * parallel.dp_replicate * parallel.cp * parallel.tp
    dp_shard = parallel.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            named = "pp*dp_replicate*cp*tp" if parallel.cp > 1 else "pp*dp_replicate*tp"
            raise ParallelError(f"world size {world_size} is not divisible by {named} = {fixed} (dp_shard = -1 takes the rest)")
        dp_shard = world_size // fixed
    shape = dict(pp=parallel.pp, dp_replicate=parallel.dp_replicate, dp_shard=dp_shard, cp=parallel.cp, tp=parallel.tp)
    if fixed * dp_shard != world_size:
        sizes = " * ".join(f"{k} {v}" for k, v in shape.items())
        raise ParallelError(f"parallel layout {sizes} = {fixed * dp_shard} processes, but the world size is {world_size}")
    return shape


def build_mesh(parallel: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    """All five dims, size-1 ones included, so code can always ask for mesh["tp"] etc., and the
    flattened `dp_shard_cp` (every rank makes its group here, together)."""
    shape = mesh_shape(parallel, world_size)
    mesh = init_device_mesh(device_type, tuple(shape.values()), mesh_dim_names=MESH_DIMS)
    mesh["dp_shard", "cp"]._flatten(DP_SHARD_CP)
    return mesh


def validate_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> dict[str, int]:
    """The mesh shape, or a one-line ParallelError naming what does not divide."""
    shape = mesh_shape(parallel, world_size)
    if model.n_layers < shape["pp"]:
        raise ParallelError(f"{model.n_layers} blocks cannot fill parallel.pp = {shape['pp']} pipeline stages")
    tp = shape["tp"]
    if tp > 1:
        _check_tensor_parallel(model, tp)
    return shape


def _check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    """tp must divide what each mixer splits (its heads or groups), the MLP width and the vocabulary."""
    divides: dict[str, int] = {}
    for name in dict.fromkeys(model.mixer_names):
        if getattr(SPECS[name].module, "tp_plan", None) is None:
            raise ParallelError(f"mixer {name} declares no tensor-parallel plan; use parallel.tp=1")
        divides |= model.mixer_config(name).tp_divides(model.d_model)
    if model.mlp != "none":
        divides["MLP width"] = model.mlp_width
    divides["model.vocab_size"] = model.vocab_size
    for what, count in divides.items():
        if count % tp:
            raise ParallelError(f"{what} ({count}) must be divisible by parallel.tp ({tp})")
