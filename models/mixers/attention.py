"""Softmax attention: grouped-query heads, RoPE, optional sliding window, SDPA."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.layers.flops import projection_flops
from models.layers.init import init_normal_, residual_scale
from models.packing import check_not_decoding, document_ids, positions_in_documents
from models.layers.rope import apply_rope
from models.spec import Mixer, MixerConfig, MixerSpec, TensorParallelPlan

if TYPE_CHECKING:
    from models.config import ModelConfig


def visible(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """[..., Tq, Tk] bool: the key is not in the query's future and (with a window of W
    tokens, the query included) not more than W - 1 tokens behind it."""
    distance = q_pos[..., :, None] - k_pos[..., None, :]
    mask = distance >= 0
    return mask if window is None else mask & (distance < window)


def mean_context(seq_len: int, window: int | None) -> float:
    """Keys per query averaged over a causal sequence: (T + 1) / 2, less with a window."""
    w = seq_len if window is None else min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len



class AttentionConfig(MixerConfig):
    num_heads: int = Field(8, gt=0)
    num_kv_heads: int | None = Field(None, gt=0, description="grouped-query KV heads; None = num_heads")
    head_dim: int | None = Field(None, gt=0, description="None = d_model // num_heads")
    window_size: int | None = Field(None, gt=0, description="sliding window in tokens; None = full causal")
    rope_theta: float = Field(10000.0, gt=0)
    qkv_bias: bool = False

    def check_shapes(self, model: ModelConfig) -> None:
        if self.head_dim is None and model.d_model % self.num_heads:
            raise ValueError(f"d_model ({model.d_model}) must be divisible by mixers.attention.num_heads ({self.num_heads})")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"mixers.attention.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.kv_heads})")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def tp_divides(self, model: ModelConfig) -> dict[str, int]:
        """GQA: the kv heads are split too, so each rank holds the kv heads its query heads read."""
        return {"mixers.attention.num_heads": self.num_heads, "mixers.attention.num_kv_heads": self.kv_heads}


class Attention(Mixer):
    tp_plan = TensorParallelPlan(colwise=("q_proj", "k_proj", "v_proj"))

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        c, d = cfg.mixers.attention, cfg.d_model
        self.cfg = c
        self.layer_idx = layer_idx
        self.init_std = cfg.init_std
        self.out_scale = residual_scale(cfg)
        self.num_heads = c.num_heads
        self.num_kv_heads = c.num_kv_heads or c.num_heads
        self.head_dim = c.head_dim or d // c.num_heads
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear ~ N(0, init_std), biases 0; out_proj also / sqrt(residual branches) (fla)."""
        init_normal_(self, self.init_std)
        with torch.no_grad():
            self.out_proj.weight.mul_(self.out_scale)

    def forward(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None, carry: dict | None = None
    ) -> Tensor:
        B, T, _ = x.shape
        window = self.cfg.window_size
        # -1 heads: under tensor parallelism the projections hold this rank's heads only
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
        check_not_decoding(cu_seqlens, cache)
        if cache is not None:
            q, k, v, mask = self._extend_cache(q, k, v, cache)
        elif cu_seqlens is not None:
            positions = positions_in_documents(cu_seqlens, B * T).view(B, T)
            documents = document_ids(cu_seqlens, B * T).view(B, T)
            q, k = apply_rope(q, positions, self.cfg.rope_theta), apply_rope(k, positions, self.cfg.rope_theta)
            same_document = documents[:, :, None] == documents[:, None, :]
            mask = (visible(positions, positions, window) & same_document)[:, None]
        else:
            positions = torch.arange(T, device=x.device)
            q, k = apply_rope(q, positions, self.cfg.rope_theta), apply_rope(k, positions, self.cfg.rope_theta)
            mask = None if window is None else visible(positions, positions, window)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=self.head_dim**-0.5,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.out_proj(o.transpose(1, 2).flatten(-2))

    def _extend_cache(self, q: Tensor, k: Tensor, v: Tensor, cache: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rotate the new tokens at their absolute positions, append their keys and values to the
        cache (keeping the last window_size when windowed) and mask against everything cached."""
        T, window = q.shape[1], self.cfg.window_size
        start = cache.get("position", 0)
        q_pos = torch.arange(start, start + T, device=q.device)
        q, k = apply_rope(q, q_pos, self.cfg.rope_theta), apply_rope(k, q_pos, self.cfg.rope_theta)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1)
        k_pos = torch.arange(start + T - k.shape[1], start + T, device=q.device)
        keep = k.shape[1] if window is None else min(window, k.shape[1])
        cache.update(k=k[:, k.shape[1] - keep:], v=v[:, k.shape[1] - keep:], position=start + T)
        return q, k, v, visible(q_pos, k_pos, window)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections plus Q K^T and the weighted sum of V over the keys each query sees."""
        scores = 2 * 2.0 * self.num_heads * self.head_dim * mean_context(seq_len, self.cfg.window_size)
        return projection_flops(self) + scores


SPEC = MixerSpec(AttentionConfig, Attention)
