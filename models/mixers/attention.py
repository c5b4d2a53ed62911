"""Softmax attention: grouped-query heads, RoPE, optional sliding window; SDPA, or flex attention
with a block-sparse document mask over packed documents."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from models.context import Piece, active_piece, no_cache
from models.layers.flops import projection_flops
from models.layers.init import init_normal_, residual_scale
from models.layers.rope import apply_rope
from models.packing import check_not_decoding, document_ids, positions_in_documents
from models.spec import ContextParallelPlan, HFNative, Mixer, MixerConfig, MixerSpec, TensorParallelPlan

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


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # one kernel per (batch, length): training has one


FLEX_BLOCK = 128  # flex attention's block of queries and of keys


def document_blocks(documents: Tensor, window: int | None, block: int = FLEX_BLOCK) -> tuple[Tensor, Tensor]:
    """Which key blocks each query block attends to, from the rows' document ids [B, T] (packed
    documents are contiguous, so ids never decrease along a row): ([B, n, n] some key visible,
    [B, n, n] every key visible), n = ceil(T / block). Exact, in O(n^2) per row: below the
    diagonal a block pair sees something iff the key block's last document is the query block's
    first (and, windowed, its nearest pair is within the window); everything iff both blocks lie
    in that one document (and its farthest pair is within the window)."""
    T = documents.shape[1]
    starts = torch.arange(0, T, block, device=documents.device)
    ends = (starts + block).clamp(max=T) - 1
    first, last = documents[:, starts], documents[:, ends]
    index = torch.arange(len(starts), device=documents.device)
    q, k = index[:, None], index[None, :]
    shared = (q > k) & (last[:, None, :] == first[:, :, None])  # [B, query block, key block]
    whole = (first == last) & (ends - starts + 1 == block)  # one document, and no padding past T
    every = shared & whole[:, :, None] & whole[:, None, :]
    if window is not None:
        shared &= (starts[:, None] - ends[None, :]) < window
        every &= (ends[:, None] - starts[None, :]) < window
    return shared | (q == k), every


def _kv_blocks(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """flex's (count, indices) form of [B, n, n] block flags: [B, 1, n], [B, 1, n, n], flagged first."""
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return blocks.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]


# the last packing's (cu_seqlens, its version, batch, length, window) and block mask: the layers of
# a forward share one tensor, so they share the mask without reading cu_seqlens back to the host
_last_block_mask: list[Any] = [None, None]


@torch.compiler.disable
def document_block_mask(cu_seqlens: Tensor, batch: int, length: int, window: int | None) -> Any:
    """flex attention's block mask for causal (windowed) attention within each packed document,
    built once per packing from block indices (`document_blocks`), never a [T, T] mask: attention
    skips the blocks wholly in the future or in other documents, and applies the mask per token
    only in the blocks a document or window boundary crosses."""
    from torch.nn.attention.flex_attention import BlockMask

    key, mask = _last_block_mask
    if key is None or key[0] is not cu_seqlens or key[1:] != (cu_seqlens._version, batch, length, window):
        positions = positions_in_documents(cu_seqlens, batch * length).view(batch, length)
        documents = document_ids(cu_seqlens, batch * length).view(batch, length)

        def mask_mod(b, h, q, k):
            seen = (documents[b, q] == documents[b, k]) & (positions[b, q] >= positions[b, k])
            return seen if window is None else seen & (positions[b, q] - positions[b, k] < window)

        some, every = document_blocks(documents, window)
        mask = BlockMask.from_kv_blocks(
            *_kv_blocks(some & ~every), *_kv_blocks(every), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(length, length)
        )
        _last_block_mask[:] = [(cu_seqlens, cu_seqlens._version, batch, length, window), mask]
    return mask


class AttentionConfig(MixerConfig):
    num_heads: int = Field(8, gt=0)
    num_kv_heads: int | None = Field(None, gt=0, description="grouped-query KV heads; None = num_heads")
    head_dim: int | None = Field(None, gt=0, description="None = d_model // num_heads")
    window_size: int | None = Field(None, gt=0, description="sliding window in tokens; None = full causal")
    rope_theta: float = Field(10000.0, gt=0)
    qkv_bias: bool = False
    packed_kernel: Literal["auto", "flex", "sdpa"] = Field(
        "auto", description="attention over packed documents: flex (block-sparse document mask), sdpa (a dense [T, T] mask); auto = flex on CUDA"
    )

    def check_shapes(self, d_model: int) -> None:
        if self.head_dim is None and d_model % self.num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by mixers.attention.num_heads ({self.num_heads})")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"mixers.attention.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.kv_heads})")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def tp_divides(self, d_model: int) -> dict[str, int]:
        """GQA: the kv heads are split too, so each rank holds the kv heads its query heads read."""
        return {"mixers.attention.num_heads": self.num_heads, "mixers.attention.num_kv_heads": self.kv_heads}


class Attention(Mixer):
    tp_plan = TensorParallelPlan(colwise=("q_proj", "k_proj", "v_proj"))
    cp_plan = ContextParallelPlan()  # no state: it reads the earlier pieces' keys and values (forward)

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
        piece = active_piece()
        no_cache(piece, cache)
        if piece is not None:
            return self.out_proj(self._context_parallel(q, k, v, piece).flatten(-2))
        if cache is not None:
            q, k, v, mask = self._extend_cache(q, k, v, cache)
        elif cu_seqlens is not None:
            positions = positions_in_documents(cu_seqlens, B * T).view(B, T)
            q, k = apply_rope(q, positions, self.cfg.rope_theta), apply_rope(k, positions, self.cfg.rope_theta)
            if self._flex(x):
                o = compiled_flex_attention()(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=document_block_mask(cu_seqlens, B, T, window),
                    scale=self.head_dim**-0.5, enable_gqa=self.num_kv_heads != self.num_heads,
                )
                return self.out_proj(o.transpose(1, 2).flatten(-2))
            documents = document_ids(cu_seqlens, B * T).view(B, T)
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

    @torch.compiler.disable
    def _context_parallel(self, q: Tensor, k: Tensor, v: Tensor, piece: Piece) -> Tensor:
        """This piece's queries against the keys and values of every earlier piece (all-gathered)
        and its own, at their positions in the whole rows; with a sliding window shorter than the
        piece, only the previous piece's last window - 1 (a halo). SDPA: with whole-row documents
        and no window, under a lower-right causal bias (fused kernels, no mask in memory);
        otherwise under an explicit [B, T, keys] mask. The last piece computes the most (causal
        imbalance, see README)."""
        window, start, T = self.cfg.window_size, piece.start, piece.length
        positions = piece.positions.to(q.device)
        q, k = apply_rope(q, positions, self.cfg.rope_theta), apply_rope(k, positions, self.cfg.rope_theta)
        if window is not None and window - 1 <= T:
            begin = start - (window - 1)
            k, v = (torch.cat([piece.from_previous(t[:, T - (window - 1):]), t], dim=1) for t in (k, v))
        else:
            begin = 0
            k, v = (piece.all_gather(t)[: piece.comm.rank + 1].transpose(0, 1).flatten(1, 2) for t in (k, v))
        q_pos = torch.arange(start, start + T, device=q.device)
        k_pos = torch.arange(begin, start + T, device=q.device)
        if window is None and piece.documents is None:
            mask = causal_lower_right(T, k_pos.numel())
        else:
            mask = visible(q_pos, k_pos, window) & (k_pos >= 0)
        if piece.documents is not None:
            documents = piece.documents.to(q.device)
            mask = (mask & (documents[:, start : start + T, None] == documents[:, k_pos.clamp(min=0)][:, None, :]))[:, None]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            scale=self.head_dim**-0.5, enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return o.transpose(1, 2)

    def _flex(self, x: Tensor) -> bool:
        kernel = self.cfg.packed_kernel
        return kernel == "flex" or (kernel == "auto" and x.is_cuda)

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


# --- Hugging Face: an attention-only model is transformers' Llama (Qwen2 with qkv bias, Mistral
# with a window); the same rotate-half RoPE, RMSNorm and SwiGLU, with these names ------------------

_LAYER = "model.layers.{i}."
HF_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "blocks.{i}.mixer_norm.weight": _LAYER + "input_layernorm.weight",
    **{f"blocks.{{i}}.mixer.{p}_proj.{w}": f"{_LAYER}self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")},
    "blocks.{i}.mixer.out_proj.weight": _LAYER + "self_attn.o_proj.weight",
    "blocks.{i}.mlp_norm.weight": _LAYER + "post_attention_layernorm.weight",
    **{f"blocks.{{i}}.mlp.{p}.weight": f"{_LAYER}mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def hf_architecture(model: ModelConfig) -> str:
    c = model.mixers.attention
    if model.mlp != "swiglu":
        raise ValueError("model.mlp is none, but transformers' Llama, Qwen2 and Mistral have a SwiGLU MLP in every layer")
    return "Qwen2ForCausalLM" if c.qkv_bias else "MistralForCausalLM" if c.window_size else "LlamaForCausalLM"


def hf_config(model: ModelConfig) -> dict[str, Any]:
    c = model.mixers.attention
    entries = {
        "vocab_size": model.vocab_size, "hidden_size": model.d_model, "intermediate_size": model.mlp_width,
        "num_hidden_layers": model.n_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim or model.d_model // c.num_heads, "hidden_act": "silu", "rms_norm_eps": model.norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": model.tie_embeddings,
    }
    if c.qkv_bias:  # Qwen2: biases on q, k, v only; a window on every layer
        return entries | ({"use_sliding_window": True, "sliding_window": c.window_size, "max_window_layers": 0} if c.window_size else {})
    if c.window_size:
        return entries | {"sliding_window": c.window_size}
    return entries | {"attention_bias": False, "mlp_bias": False}


def hf_model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ebb `model` section of a Llama, Qwen2 or Mistral config (a dict with its defaults)."""
    kind = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r}: ebb's MLP is SwiGLU (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention_bias/mlp_bias: ebb's attention has no output-projection bias and its MLP no biases")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope type {rope.get('rope_type', rope.get('type'))!r}: ebb's RoPE is the default (unscaled) one")
    window = hf.get("sliding_window") if kind == "mistral" else None
    if kind == "qwen2" and hf.get("use_sliding_window"):
        kinds = set(hf.get("layer_types") or ["sliding_attention"])
        if kinds != {"sliding_attention"}:
            raise ValueError("a sliding window on some layers only: ebb's attention blocks share one window_size")
        window = hf["sliding_window"]
    heads = hf["num_attention_heads"]
    return {
        "pattern": "*" * hf["num_hidden_layers"], "d_model": hf["hidden_size"], "vocab_size": hf["vocab_size"],
        "mlp": "swiglu", "mlp_hidden": hf["intermediate_size"], "tie_embeddings": bool(hf.get("tie_word_embeddings")),
        "norm_eps": hf["rms_norm_eps"],
        "mixers": {"attention": {
            "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads, "window_size": window,
            "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)), "qkv_bias": kind == "qwen2",
        }},
    }


HF = HFNative(
    architectures=("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"),
    architecture=hf_architecture, config=hf_config, model_config=hf_model_config, names=HF_NAMES,
)

SPEC = MixerSpec(AttentionConfig, Attention, hf=HF)
