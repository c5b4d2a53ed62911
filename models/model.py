"""HybridLM: a stack of pre-norm blocks (mixer + SwiGLU), one per pattern character."""
from __future__ import annotations

import math
from collections import UserDict

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.mixers import build_mixer
from models.mixers.rwkv7 import RWKV7ChannelMix
from models.mlp import SwiGLU
from models.norms import RMSNorm


def build_mlp(kind: str, cfg: ModelConfig, layer_idx: int) -> nn.Module | None:
    """SwiGLU, or RWKV's channel-mix in R blocks when model.mixers.rwkv7.channel_mix; None
    when model.mlp is none."""
    if cfg.mlp == "none":
        return None
    if kind == "R" and cfg.mixers.rwkv7.channel_mix:
        return RWKV7ChannelMix(cfg, layer_idx)
    return SwiGLU(cfg.d_model, cfg.mlp_width)


class CarryView(UserDict):
    """The carry dict as blocks receive it: the caller's dict itself, behind a mapping that is not
    a dict. Wrappers that rebuild dict arguments holding tensors that need grad (FSDP2 does, for
    every wrapped block) hand this very object on, so blocks' writes reach the caller."""

    def __init__(self, carry: dict[str, Tensor]):
        self.data = carry  # shared, not copied


class Block(nn.Module):
    def __init__(self, kind: str, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.mlp != "none" else None
        self.mlp = build_mlp(kind, cfg, layer_idx)

    def forward(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None, carry: dict | None = None
    ) -> Tensor:
        x = x + self.mixer(self.mixer_norm(x), cu_seqlens=cu_seqlens, cache=cache, carry=carry)
        if self.mlp is None:
            return x
        if isinstance(self.mlp, RWKV7ChannelMix):  # token shift: needs documents and the cache
            return x + self.mlp(self.mlp_norm(x), cu_seqlens=cu_seqlens, cache=cache)
        return x + self.mlp(self.mlp_norm(x))

    def flops_per_token(self, seq_len: int) -> float:
        mlp = 0.0 if self.mlp is None else self.mlp.flops_per_token()
        return self.mixer.flops_per_token(seq_len) + mlp


def with_row_starts(cu_seqlens: Tensor, batch: int, length: int) -> Tensor:
    """Document starts over the flattened batch, with every row start added so that no
    document (and no recurrent state) crosses from one row into the next."""
    rows = torch.arange(0, batch * length + 1, length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.unique(torch.cat([cu_seqlens, rows]))


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(kind, cfg, i) for i, kind in enumerate(cfg.blocks))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings, MLPs and an untied head ~ N(0, init_std); MLP down-projections scaled by
        1/sqrt(residual branches) (GPT-2). Each mixer, and RWKV's channel-mix, initialises
        itself as its paper does."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=std)
        n_residuals = self.cfg.residuals_per_block * self.cfg.n_layers
        down_std = std / math.sqrt(n_residuals) if self.cfg.rescale_residual else std
        for block in self.blocks:
            if not isinstance(block.mlp, SwiGLU):
                continue
            nn.init.normal_(block.mlp.gate_proj.weight, std=std)
            nn.init.normal_(block.mlp.up_proj.weight, std=std)
            nn.init.normal_(block.mlp.down_proj.weight, std=down_std)

    def forward(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor | None = None,
        cache: list[dict] | None = None,
        carry: dict | None = None,
    ) -> Tensor:
        """Logits [B, T, vocab]. `cu_seqlens` marks document starts over the flattened B*T tokens
        (packed training); `cache` (from `new_cache`) makes the call a prefill or decode step;
        `carry`, when given, receives what the blocks pass along, e.g. carry["aux_loss"]."""
        if cache is not None and cu_seqlens is not None:
            raise ValueError("decoding from a cache does not take cu_seqlens")
        if cu_seqlens is not None:
            cu_seqlens = with_row_starts(cu_seqlens, *input_ids.shape)
        carry = CarryView({} if carry is None else carry)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cu_seqlens=cu_seqlens, cache=None if cache is None else cache[i], carry=carry)
        return self.lm_head(self.norm(x))

    def new_cache(self) -> list[dict]:
        """One empty state per block; mixers fill and update their own entry in place."""
        return [{} for _ in self.blocks]

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, counted per mixer from its own algorithm (DESIGN.md)."""
        blocks = sum(block.flops_per_token(seq_len) for block in self.blocks)
        return blocks + 2.0 * self.cfg.d_model * self.cfg.vocab_size
