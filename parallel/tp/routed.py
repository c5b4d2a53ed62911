"""The routed mixers, sharded by head: Mixture-of-Memories ('O') and Sparse State Expansion ('S').

The router is replicated and reads the replicated input, so every rank routes every token the
same way and the routes (and the memories' token streams) are identical across ranks. Its
chosen probabilities weight read-outs of this rank's heads only, so their gradient is summed
over the mesh (`ReplicatedRouter`); the auxiliary balance loss is computed from the router's
probabilities alone: identical on every rank and added once to each rank's (replicated) loss, so
its gradient is already whole and is not summed again.

MoM: q and every memory's fused k/v/b/a projection (stored head-major) colwise, the shared
A_log and dt_bias by head, the short convs by channel, g_proj colwise. The output norm's weight
(one head's width, shared by all heads) is replicated with its gradient summed over ranks.

SSE: q, k, v projections colwise, the LoRAs' first matrices (model width -> rank) replicated and
their second colwise, as for g_proj's two factors; the short convs by channel. a_proj, b_proj,
A_log and dt_bias (2H, stored head-major: [dense_h, partition_h] per head) split by head, so each
rank keeps both gates of its heads. The output norm as in MoM.

Replicated parameters other than the norm's see the replicated input, whose gradient through
the colwise projections is already summed, so every rank computes their whole gradient."""
from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from models.config import ModelConfig
from parallel.tp.delta_rule import SHORT_CONVS
from parallel.tp.styles import LocalParameters


class ReplicatedRouter(LocalParameters):
    """A TopKRouter with its weight replicated; the gradient of its chosen probabilities (third
    output) is summed over the mesh, that of its probabilities (first output, the aux loss's
    input) is not."""

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


def _short_conv_styles(mixer: nn.Module) -> dict[str, ParallelStyle]:
    """By channel, for the convolutions the mixer has (optional; SSE has none on v)."""
    return {name: LocalParameters(sharded=("weight", "bias")) for name in SHORT_CONVS if getattr(mixer, name, None) is not None}


def mom_plan(mixer: nn.Module) -> dict[str, ParallelStyle]:
    styles: dict[str, ParallelStyle] = {"router": ReplicatedRouter(), "q_proj": ColwiseParallel(), "g_proj": ColwiseParallel()}
    styles |= {f"memories.{i}": ColwiseParallel() for i in range(len(mixer.memories))}
    styles |= _short_conv_styles(mixer)
    styles["o_norm"] = LocalParameters(replicated=("weight",), partial_grads=True)
    styles[""] = LocalParameters(sharded=("A_log", "dt_bias"))
    return styles


def sse_plan(mixer: nn.Module) -> dict[str, ParallelStyle]:
    styles: dict[str, ParallelStyle] = {name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj")}
    for low_rank in ("q_lora", "k_lora", "g_proj"):
        styles[f"{low_rank}.0"] = LocalParameters(replicated=("weight",))
        styles[f"{low_rank}.1"] = ColwiseParallel()
    styles |= _short_conv_styles(mixer)
    styles["router"] = ReplicatedRouter()
    styles["o_norm"] = LocalParameters(replicated=("weight",), partial_grads=True)
    styles[""] = LocalParameters(sharded=("A_log", "dt_bias"))
    return styles


def mom_divisibility_error(cfg: ModelConfig, tp: int) -> str | None:
    heads = cfg.mixers.mom.num_heads
    return f"mixers.mom.num_heads ({heads}) must be divisible by parallel.tp ({tp})" if heads % tp else None


def sse_divisibility_error(cfg: ModelConfig, tp: int) -> str | None:
    heads = cfg.mixers.sse.num_heads
    return f"mixers.sse.num_heads ({heads}) must be divisible by parallel.tp ({tp})" if heads % tp else None
