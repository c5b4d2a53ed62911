"""Sequence mixers, one per pattern character (DESIGN.md), all with the same contract:
`Mixer(cfg, layer_idx)`, `forward(x, cu_seqlens=None, cache=None, carry=None)`,
`reset_parameters()`, `flops_per_token(seq_len)`, and an output projection named `out_proj`.

`carry` is the dict of tensors that cross blocks (RWKV-7's first-layer values, auxiliary
losses to add to the training loss under "aux_loss"): it flows explicitly through the model so
that pipeline stages can pass it on. Mixers that need nothing from it ignore it."""
from __future__ import annotations

from torch import nn

from models.config import ModelConfig
from models.mixers.attention import Attention
from models.mixers.deltanet import DeltaNet
from models.mixers.gated_deltanet import GatedDeltaNet
from models.mixers.mamba2 import Mamba2
from models.mixers.mom import MoM
from models.mixers.rwkv7 import RWKV7
from models.mixers.sse import SSE

MIXERS: dict[str, type[nn.Module]] = {"*": Attention, "M": Mamba2, "T": DeltaNet, "G": GatedDeltaNet, "R": RWKV7, "O": MoM, "S": SSE}


def build_mixer(char: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if char not in MIXERS:
        raise ValueError(f"no mixer for pattern character {char!r}; known: {', '.join(MIXERS)}")
    return MIXERS[char](cfg, layer_idx)
