"""DeltaNet ('T') and Gated DeltaNet ('G'), sharded by head: q, k, v and the per-head a, b, g
projections colwise, the short convs by channel, A_log and dt_bias by head. The output norm's
weight is one head's width, shared by all heads: it is replicated and its gradient summed over
ranks. With GVA each rank holds num_heads/tp q/k heads and the num_v_heads/tp value heads they
serve."""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from models.config import ModelConfig
from parallel.tp.styles import LocalParameters

PER_HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj")
SHORT_CONVS = ("q_conv1d", "k_conv1d", "v_conv1d")


def plan(mixer: nn.Module) -> dict[str, ParallelStyle]:
    """Optional pieces (g_proj, b_proj, convs, GDN's decay) get a style only where built."""
    children = dict(mixer.named_children())
    styles: dict[str, ParallelStyle] = {n: ColwiseParallel() for n in PER_HEAD_PROJECTIONS if n in children}
    styles |= {n: LocalParameters(sharded=("weight", "bias")) for n in SHORT_CONVS if n in children}
    styles["o_norm"] = LocalParameters(replicated=("weight",), partial_grads=True)
    if "A_log" in dict(mixer.named_parameters(recurse=False)):
        styles[""] = LocalParameters(sharded=("A_log", "dt_bias"))
    return styles


def deltanet_divisibility_error(cfg: ModelConfig, tp: int) -> str | None:
    heads = cfg.mixers.deltanet.num_heads
    return f"mixers.deltanet.num_heads ({heads}) must be divisible by parallel.tp ({tp})" if heads % tp else None


def gated_deltanet_divisibility_error(cfg: ModelConfig, tp: int) -> str | None:
    """num_v_heads is a multiple of num_heads, so it divides too."""
    heads = cfg.mixers.gated_deltanet.num_heads
    return f"mixers.gated_deltanet.num_heads ({heads}) must be divisible by parallel.tp ({tp})" if heads % tp else None
