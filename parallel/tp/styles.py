"""ParallelStyles for what torch's Colwise/RowwiseParallel (made for Linear and Embedding) do not
cover: parameters a layer uses directly in its forward, and top-k routers."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


def _redistributed(param: nn.Parameter, placement: Placement, mesh: DeviceMesh, src_data_rank: int | None) -> nn.Parameter:
    """`param` as a DTensor Parameter, keeping its attributes (e.g. `_no_weight_decay`)."""
    new = nn.Parameter(distribute_tensor(param.detach(), mesh, [placement], src_data_rank=src_data_rank), param.requires_grad)
    new.__dict__.update(param.__dict__)
    return new


class LocalParameters(ParallelStyle):
    """Distributes a module's own parameters over the TP mesh and runs its forward on their local
    tensors, so that code written for plain tensors (A_log, conv taps, norm weights) is unchanged.

    `sharded` parameters are split on dim 0, per head or channel. `replicated` ones are whole on
    every rank, which computed their whole gradient already (replicated activations). `summed`
    ones are whole on every rank but each rank used them on its own heads only: their gradients
    are summed over the mesh."""

    def __init__(self, sharded: Sequence[str] = (), replicated: Sequence[str] = (), summed: Sequence[str] = ()):
        super().__init__()
        self.sharded, self.replicated, self.summed = tuple(sharded), tuple(replicated), tuple(summed)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        names = [n for n in (*self.sharded, *self.replicated, *self.summed) if module._parameters.get(n) is not None]
        for name in names:
            placement = Shard(0) if name in self.sharded else Replicate()
            param = _redistributed(module._parameters[name], placement, device_mesh, self.src_data_rank)
            if name in self.summed:
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
        if name in self.summed:
            return param.to_local(grad_placements=[Partial()])
        return param.to_local()


class ReplicatedRouter(LocalParameters):
    """A top-k router (forward -> probabilities, chosen indices, chosen probabilities) with its
    weight replicated. It reads the replicated input, so every rank routes every token the same
    way; the chosen probabilities weight read-outs of this rank's heads only, so their gradient is
    summed over the mesh. That of the probabilities (the auxiliary loss's input, identical on
    every rank and counted once) is not."""

    def __init__(self) -> None:
        super().__init__(replicated=("weight",))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        super()._apply(module, device_mesh)

        def sum_chosen_grads(mod: nn.Module, args: tuple, output: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
            probs, chosen, chosen_probs = output
            return probs, chosen, _grad_summed_over(chosen_probs, device_mesh)

        module.register_forward_hook(sum_chosen_grads)
        return module


def _grad_summed_over(t: Tensor, mesh: DeviceMesh) -> Tensor:
    """`t` unchanged; in backward its gradient is all-reduced (each rank's is partial)."""
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
