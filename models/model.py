"""HybridLM: a stack of pre-norm blocks (mixer + MLP), one per pattern character."""
from __future__ import annotations

from collections import UserDict
from collections.abc import Callable

from torch import Tensor, nn

from models.config import ModelConfig
from models.layers.norms import RMSNorm
from models.mixers import spec_of
from models.mlp import SwiGLU
from models.packing import check_not_decoding, with_row_starts


def build_mixer(kind: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The mixer of pattern character `kind`."""
    return spec_of(kind).module(cfg, layer_idx)


def build_mlp(kind: str, cfg: ModelConfig, layer_idx: int) -> nn.Module | None:
    """The MLP the block's mixer brings, else SwiGLU; None when model.mlp is none."""
    if cfg.mlp == "none":
        return None
    return (spec_of(kind).mlp or SwiGLU)(cfg, layer_idx)


class CarryView(UserDict):
    """The carry dict as blocks receive it: the caller's dict itself, behind a mapping that is not
    a dict. Wrappers that rebuild dict arguments holding tensors that need grad (FSDP2 does, for
    every wrapped block) hand this very object on, so blocks' writes reach the caller."""

    def __init__(self, carry: dict[str, Tensor]):
        self.data = carry  # shared, not copied


class Block(nn.Module):
    def __init__(self, kind: str, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.kind = kind  # the pattern character
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
        return x + self.mlp(self.mlp_norm(x), cu_seqlens=cu_seqlens, cache=cache)

    def flops_per_token(self, seq_len: int) -> float:
        mlp = 0.0 if self.mlp is None else self.mlp.flops_per_token()
        return self.mixer.flops_per_token(seq_len) + mlp


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
        """Embeddings and an untied head ~ N(0, init_std), then every MLP's own init. Each mixer
        initialises itself (as its paper does) when built."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            if block.mlp is not None:
                block.mlp.reset_parameters()

    def forward(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor | None = None,
        cache: list[dict] | None = None,
        carry: dict | None = None,
        head: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Logits [B, T, vocab]. `cu_seqlens` marks document starts over the flattened B*T tokens
        (packed training); `cache` (from `new_cache`) makes the call a prefill or decode step;
        `carry`, when given, receives what the blocks pass along, e.g. carry["aux_loss"].

        With `head`, what `head(hidden, lm_head.weight)` returns instead of the logits, `hidden`
        being the final norm's output [B, T, d_model]: a loss that applies the head itself (in
        chunks, never holding the logits), called inside this forward so that wrappers that
        gather parameters around it (FSDP) hold the head's weight."""
        check_not_decoding(cu_seqlens, cache)
        if cu_seqlens is not None:
            cu_seqlens = with_row_starts(cu_seqlens, *input_ids.shape)
        carry = CarryView({} if carry is None else carry)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cu_seqlens=cu_seqlens, cache=None if cache is None else cache[i], carry=carry)
        x = self.norm(x)
        return self.lm_head(x) if head is None else head(x, self.lm_head.weight)

    def new_cache(self) -> list[dict]:
        """One empty state per block; mixers fill and update their own entry in place."""
        return [{} for _ in self.blocks]

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, counted per mixer from its own algorithm (docs/design.md section 11)."""
        blocks = sum(block.flops_per_token(seq_len) for block in self.blocks)
        return blocks + 2.0 * self.cfg.d_model * self.cfg.vocab_size
