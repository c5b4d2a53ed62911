"""RWKV-7 time-mix ('R') and channel-mix, sharded by head.

Time-mix: r, k, v projections colwise; each LoRA's first matrix (model width -> rank) replicated,
its second (rank -> channels) colwise; the per-channel vectors acting on head channels (w0, a0,
v0, k_k, k_a) and r_k by channel/head; the per-head GroupNorm's weight and bias by channel. The
token-shift coefficients `mu` act on the model width: replicated. Every rank holds the same
channels in every R block, so carry["v_first"] (this rank's values of the first R block) lines up.

The channel-mix (R blocks' MLP) is sharded with the MLPs in `apply_tensor_parallel`. The
replicated parameters see replicated activations whose gradients the colwise inputs already
sum, so every rank computes their whole gradient."""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from models.config import ModelConfig
from parallel.tp.styles import LocalParameters

PROJECTIONS = ("r_proj", "k_proj", "v_proj")
LORAS = ("w_lora", "a_lora", "v_lora", "g_lora")
HEAD_CHANNEL_VECTORS = ("w0", "a0", "v0", "k_k", "k_a", "r_k")


def plan(mixer: nn.Module) -> dict[str, ParallelStyle]:
    """The first R block has no value-residual LoRA (v_lora, v0)."""
    styles: dict[str, ParallelStyle] = {name: ColwiseParallel() for name in PROJECTIONS}
    for lora in (name for name in LORAS if getattr(mixer, name) is not None):
        styles[f"{lora}.down"] = LocalParameters(replicated=("weight",))
        styles[f"{lora}.up"] = ColwiseParallel()
    styles["o_norm"] = LocalParameters(sharded=("weight", "bias"))
    styles[""] = LocalParameters(sharded=HEAD_CHANNEL_VECTORS, replicated=("mu",))
    return styles


def divisibility_error(cfg: ModelConfig, tp: int) -> str | None:
    """Whole heads per rank; the channel-mix's hidden width must split too."""
    heads = cfg.d_model // cfg.mixers.rwkv7.head_dim
    if heads % tp:
        return f"RWKV-7 heads (d_model / mixers.rwkv7.head_dim = {heads}) must be divisible by parallel.tp ({tp})"
    hidden = cfg.mixers.rwkv7.channel_mix_hidden or 4 * cfg.d_model
    if cfg.mlp != "none" and cfg.mixers.rwkv7.channel_mix and hidden % tp:
        return f"mixers.rwkv7.channel_mix_hidden ({hidden}) must be divisible by parallel.tp ({tp})"
    return None
