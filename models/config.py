"""Typed model configuration: the `model` section of a run config.

A hybrid stack is a pattern string, one character per block (DESIGN.md): `*` attention,
`M` Mamba2, `T` DeltaNet, `G` Gated DeltaNet, `R` RWKV-7, `O` MoM, `S` SSE.
Spaces are ignored and `|` marks a pipeline-stage cut.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.config import Strict

IMPLEMENTED_MIXERS = {"*": "attention", "M": "mamba2", "T": "deltanet", "G": "gated_deltanet", "R": "rwkv7", "O": "mom", "S": "sse"}
RESERVED_MIXERS: dict[str, str] = {}


class AttentionConfig(Strict):
    num_heads: int = Field(8, gt=0)
    num_kv_heads: int | None = Field(None, gt=0, description="grouped-query KV heads; None = num_heads")
    head_dim: int | None = Field(None, gt=0, description="None = d_model // num_heads")
    window_size: int | None = Field(None, gt=0, description="sliding window in tokens; None = full causal")
    rope_theta: float = Field(10000.0, gt=0)
    qkv_bias: bool = False


class Mamba2Config(Strict):
    d_state: int = Field(128, gt=0)
    d_conv: int = Field(4, gt=0)
    expand: int = Field(2, gt=0)
    head_dim: int = Field(64, gt=0)
    n_groups: int = Field(1, gt=0)
    chunk_size: int = Field(256, gt=0)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    conv_bias: bool = True
    norm_eps: float = Field(1e-5, gt=0)


class DeltaNetConfig(Strict):
    num_heads: int = Field(4, gt=0)
    head_dim: int | None = Field(None, gt=0, description="None = d_model // num_heads")
    expand_v: float = Field(1.0, gt=0)
    use_beta: bool = True
    use_gate: bool = False
    use_short_conv: bool = True
    conv_size: int = Field(4, gt=0)
    allow_neg_eigval: bool = False
    chunk_size: int = Field(64, gt=0)
    norm_eps: float = Field(1e-5, gt=0)


class GatedDecayConfig(Strict):
    """What the mixers built from Gated DeltaNet states share (GDN, MoM, SSE): the decay
    g = -exp(A_log) softplus(a + dt_bias) and its initialisation (spec 3d), the op's chunk size
    and the output norm's eps."""

    A_init_range: tuple[float, float] = Field((0.0, 16.0), description="A ~ U(range), A_log = log A")
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    chunk_size: int = Field(64, gt=0)
    norm_eps: float = Field(1e-6, gt=0)


class GatedDeltaNetConfig(GatedDecayConfig):
    num_heads: int = Field(4, gt=0, description="query/key heads")
    num_v_heads: int | None = Field(None, gt=0, description="value heads (GVA); a multiple of num_heads")
    head_dim: int = Field(64, gt=0)
    expand_v: float = Field(2.0, gt=0)
    use_short_conv: bool = True
    conv_size: int = Field(4, gt=0)
    allow_neg_eigval: bool = False

    @model_validator(mode="after")
    def _gva(self) -> "GatedDeltaNetConfig":
        if self.num_v_heads is not None and self.num_v_heads % self.num_heads:
            raise ValueError(
                f"num_v_heads ({self.num_v_heads}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self


class RWKV7Config(Strict):
    """RWKV-7 time-mix (specs/layers.md section 4); LoRA ranks None = the official rule
    max(32, round(m sqrt(d_model) / 32) * 32), m = 2.5 (decay, a) and 1.7 (value residual) times
    head_dim / 64, m = 5 (output gate)."""

    head_dim: int = Field(64, gt=0)
    decay_rank: int | None = Field(None, gt=0)
    a_rank: int | None = Field(None, gt=0, description="rank of the in-context learning rate's LoRA")
    v_rank: int | None = Field(None, gt=0, description="rank of the value-residual mix's LoRA")
    gate_rank: int | None = Field(None, gt=0)
    channel_mix: bool = Field(True, description="R blocks' MLP is RWKV's channel-mix instead of SwiGLU")
    channel_mix_hidden: int | None = Field(None, gt=0, description="None = 4 d_model")
    chunk_size: int = Field(64, gt=0)
    norm_eps: float = Field(64e-5, gt=0, description="eps of the per-head GroupNorm")


class MoMConfig(GatedDecayConfig):
    """Mixture-of-Memories (specs/layers.md section 5): Gated DeltaNet memories, top-k routed."""

    num_memories: int = Field(4, gt=0)
    topk: int = Field(2, gt=0)
    shared_memory: bool = Field(True, description="one more memory that sees every token")
    num_heads: int = Field(4, gt=0)
    head_dim: int = Field(64, gt=0)
    expand_v: float = Field(1.0, gt=0)
    capacity: float | None = Field(
        None, ge=0, description="each memory keeps the last ceil(capacity*L/topk) routed tokens of a document of L; None/0 = all"
    )
    aux_loss_scale: float = Field(0.01, ge=0)
    use_short_conv: bool = True
    conv_size: int = Field(4, gt=1)
    allow_neg_eigval: bool = False

    @model_validator(mode="after")
    def _topk(self) -> "MoMConfig":
        if self.topk > self.num_memories:
            raise ValueError(f"topk ({self.topk}) must be <= num_memories ({self.num_memories})")
        return self


class SSEConfig(GatedDecayConfig):
    """Sparse State Expansion, SSEGDN form (specs/layers.md section 6)."""

    num_partitions: int = Field(4, gt=0)
    topk: int = Field(1, gt=0, description="partitions each token writes to and reads from")
    num_heads: int = Field(4, gt=0)
    head_dim: int = Field(64, gt=0)
    expand_v: float = Field(2.0, gt=0)
    lora_rank: int | None = Field(None, gt=0, description="rank of the partition stream's q/k offsets; None = head_v_dim")
    use_short_conv: bool = False
    conv_size: int = Field(4, gt=1)
    impl: Literal["varlen", "mask"] = Field("varlen", description="varlen: routed tokens as segments; mask: N+1 masked head copies")
    aux_loss_scale: float = Field(0.01, ge=0)

    @model_validator(mode="after")
    def _topk(self) -> "SSEConfig":
        if self.topk > self.num_partitions:
            raise ValueError(f"topk ({self.topk}) must be <= num_partitions ({self.num_partitions})")
        return self


class MixersConfig(Strict):
    attention: AttentionConfig = AttentionConfig()
    mamba2: Mamba2Config = Mamba2Config()
    deltanet: DeltaNetConfig = DeltaNetConfig()
    gated_deltanet: GatedDeltaNetConfig = GatedDeltaNetConfig()
    rwkv7: RWKV7Config = RWKV7Config()
    mom: MoMConfig = MoMConfig()
    sse: SSEConfig = SSEConfig()


class ModelConfig(Strict):
    pattern: str = "MTG*"
    d_model: int = Field(256, gt=0)
    vocab_size: int = Field(320, gt=0, description="byte tokenizer (257 ids) padded to a multiple of 64 by default")
    mlp: Literal["swiglu", "none"] = Field("swiglu", description="the MLP of every block; none = mixer-only blocks (Mamba2 style)")
    mlp_hidden: int | None = Field(None, gt=0, description="SwiGLU hidden width; None = 8/3 d_model rounded to 64")
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    rescale_residual: bool = True
    mixers: MixersConfig = MixersConfig()

    @field_validator("pattern")
    @classmethod
    def _known_characters(cls, pattern: str) -> str:
        for ch in pattern:
            if ch in " |" or ch in IMPLEMENTED_MIXERS:
                continue
            if ch in RESERVED_MIXERS:
                raise ValueError(f"mixer {ch!r} ({RESERVED_MIXERS[ch]}) is not implemented yet")
            known = ", ".join(f"{c!r} {n}" for c, n in IMPLEMENTED_MIXERS.items())
            raise ValueError(f"unknown mixer character {ch!r}; known: {known}, ' ' and '|'")
        if not cls.blocks_of(pattern):
            raise ValueError("pattern has no blocks")
        return pattern

    @staticmethod
    def blocks_of(pattern: str) -> str:
        return "".join(ch for ch in pattern if ch not in " |")

    @property
    def blocks(self) -> str:
        """The pattern with spaces and stage cuts removed: one character per block."""
        return self.blocks_of(self.pattern)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def residuals_per_block(self) -> int:
        """Residual branches per block (mixer, and MLP unless mlp is none), for init scaling."""
        return 1 if self.mlp == "none" else 2

    @property
    def mlp_width(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 64 * ((8 * self.d_model // 3 + 63) // 64)

    @model_validator(mode="after")
    def _shapes_divide(self) -> "ModelConfig":
        blocks, m, d = self.blocks, self.mixers, self.d_model
        if "*" in blocks:
            a = m.attention
            if a.head_dim is None and d % a.num_heads:
                raise ValueError(f"d_model ({d}) must be divisible by mixers.attention.num_heads ({a.num_heads})")
            kv = a.num_kv_heads or a.num_heads
            if a.num_heads % kv:
                raise ValueError(f"mixers.attention.num_heads ({a.num_heads}) must be a multiple of num_kv_heads ({kv})")
        if "M" in blocks:
            mm = m.mamba2
            d_inner = mm.expand * d
            if d_inner % mm.head_dim:
                raise ValueError(f"expand*d_model ({d_inner}) must be divisible by mixers.mamba2.head_dim ({mm.head_dim})")
            if (d_inner // mm.head_dim) % mm.n_groups:
                raise ValueError(f"mamba2 heads ({d_inner // mm.head_dim}) must be divisible by mixers.mamba2.n_groups ({mm.n_groups})")
        if "R" in blocks and d % m.rwkv7.head_dim:
            raise ValueError(f"d_model ({d}) must be divisible by mixers.rwkv7.head_dim ({m.rwkv7.head_dim})")
        if "T" in blocks and m.deltanet.head_dim is None and d % m.deltanet.num_heads:
            raise ValueError(f"d_model ({d}) must be divisible by mixers.deltanet.num_heads ({m.deltanet.num_heads})")
        return self
