"""ParallelStyles for what torch's Colwise/RowwiseParallel (made for Linear and Embedding) do not
cover: parameters a mixer uses directly in its forward, and Mamba2's fused input projection."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle


def rank_major_rows(segments: Sequence[int], tp: int) -> Tensor:
    """Row order that puts each rank's slice of every segment of a concatenated dim together.

    For a dim made of segments [z | x | B | C | dt], rank r's contiguous Shard(0) chunk of the
    reordered tensor is [z_r | x_r | B_r | C_r | dt_r]."""
    starts = torch.tensor([0, *segments]).cumsum(0)[:-1].tolist()
    return torch.cat([
        torch.arange(start + rank * size // tp, start + (rank + 1) * size // tp)
        for rank in range(tp)
        for start, size in zip(starts, segments)
    ])


def _redistributed(param: nn.Parameter, placement: Placement, mesh: DeviceMesh, src_data_rank: int | None,
                   rows: Tensor | None = None) -> nn.Parameter:
    """`param` as a DTensor Parameter (rows reordered first when given), keeping its attributes
    (e.g. `_no_weight_decay`)."""
    data = param.detach() if rows is None else param.detach()[rows]
    new = nn.Parameter(distribute_tensor(data, mesh, [placement], src_data_rank=src_data_rank), param.requires_grad)
    new.__dict__.update(param.__dict__)
    return new


class LocalParameters(ParallelStyle):
    """Distributes a module's own parameters over the TP mesh and runs its forward on their local
    tensors, so that code written for plain tensors (A_log, conv taps, norm weights) is unchanged.

    `sharded` parameters are split on dim 0, per head or channel; with `segments` that dim is a
    concatenation of per-head blocks and each rank gets its slice of every block
    (`rank_major_rows`). `replicated` parameters are whole on every rank: with `partial_grads`
    each rank used them on its own heads only and their gradients are summed over the mesh;
    otherwise every rank computed the whole gradient already (replicated activations)."""

    def __init__(self, sharded: Sequence[str] = (), replicated: Sequence[str] = (), *,
                 segments: Sequence[int] | None = None, partial_grads: bool = False):
        super().__init__()
        self.sharded, self.replicated = tuple(sharded), tuple(replicated)
        self.segments = segments
        self.partial_grads = partial_grads

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rows = None if self.segments is None else rank_major_rows(self.segments, device_mesh.size())
        names = [n for n in (*self.sharded, *self.replicated) if module._parameters.get(n) is not None]
        for name in names:
            placement = Shard(0) if name in self.sharded else Replicate()
            param = _redistributed(module._parameters[name], placement, device_mesh, self.src_data_rank,
                                   rows if name in self.sharded else None)
            if name in self.replicated and self.partial_grads:
                param.register_hook(lambda grad: grad.redistribute(grad.device_mesh, [Replicate()]))
            module.register_parameter(name, param)

        held: dict[str, nn.Parameter] = {}

        def expose_local(mod: nn.Module, args: tuple) -> None:
            for name in names:
                held[name] = mod._parameters[name]
                mod._parameters[name] = self._local(name, held[name])

        def restore(mod: nn.Module, args: tuple, output: object) -> None:
            mod._parameters.update(held)
            held.clear()

        module.register_forward_pre_hook(expose_local)
        module.register_forward_hook(restore)
        return module

    def _local(self, name: str, param: DTensor) -> Tensor:
        if name in self.replicated and self.partial_grads:
            return param.to_local(grad_placements=[Partial()])
        return param.to_local()


class FusedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a Linear whose output concatenates per-head `segments` (Mamba2's
    in_proj [z | x | B | C | dt]): the rows are reordered rank-major first, so each rank computes
    its own slice of every segment and the shard layout is that of a mixer with tp times fewer
    heads. The DTensor's global row order is therefore the rank-major one (`rank_major_rows`)."""

    def __init__(self, segments: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.segments = tuple(segments)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rows = rank_major_rows(self.segments, device_mesh.size())
        with torch.no_grad():
            for name, param in list(module.named_parameters(recurse=False)):
                reordered = nn.Parameter(param[rows], param.requires_grad)
                reordered.__dict__.update(param.__dict__)
                module.register_parameter(name, reordered)
        return super()._apply(module, device_mesh)
