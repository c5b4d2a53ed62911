"""RWKV-7 "Goose" time-mix (pattern character R) and the RWKV channel-mix, docs/layers.md
section 4 (BlinkDL's `RWKV_Tmix_x070` / `RWKV_CMix_x070`).

Per head (N = head_dim) the state follows S_t = S_{t-1}(diag(w_t) - kappa_t (a_t o kappa_t)^T)
+ v_t k_t^T, y_t = S_t r_t, run by `chunk_rwkv7` with a = -kappa, b = kappa o a and scale 1.

Value residual: the first R block of the stack stores its values in `carry["v_first"]` ([B, T, the
value channels of the heads it holds]: all d_model in one process, this rank's heads under tensor
parallelism, the same in every R block); every later R block mixes them into its own values,
v <- v + (v_first - v) sigmoid(v0 + LoRA(x_v)). The entry crosses pipeline stages like any other
carry entry (`carry_writes`).

Initialisation is the official one (4d), with l = the block's index in the whole stack and
L = the number of blocks (model.init_std and rescale_residual do not apply; out_proj starts at
zero). The per-channel vectors (mu, w0, a0, v0, k_k, k_a, r_k) skip weight decay; the official
recipe also gives w0 twice the learning rate: an `optim.overrides` entry with `lr_scale: 2.0`
does that (README).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.layers.conv import token_shift
from models.layers.flops import dplr_recurrence_flops, projection_flops
from models.layers.init import no_weight_decay
from models.layers.recurrence import cached_recurrence
from models.mlp import SwiGLU
from models.ops import chunk_rwkv7
from models.packing import as_one_sequence
from models.spec import ContextParallelPlan, Mixer, MixerConfig, MixerSpec, TensorParallelPlan

if TYPE_CHECKING:
    from models.config import ModelConfig

LOG_DECAY_SCALE = math.exp(-0.5)  # log w = -e^-0.5 sigmoid(d): w in (0.545, 1)
MIX_EXPONENTS = (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)  # official mu init of x_r, x_w, x_k, x_v, x_a, x_g


def lora_rank(multiplier: float, d_model: int) -> int:
    """The official LoRA width: max(32, round(multiplier sqrt(d_model) / 32) * 32)."""
    return max(32, round(multiplier * math.sqrt(d_model) / 32) * 32)


class LoRA(nn.Module):
    """x -> up(activation(down(x))): RWKV-7's low-rank data-dependent terms."""

    def __init__(self, dim: int, rank: int, activation: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        self.activation = activation

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official: down = 0, up orthogonal with gain 0.1 (times sqrt(rank / dim) when rank > dim)."""
        nn.init.zeros_(self.down.weight)
        rank, dim = self.down.out_features, self.down.in_features
        nn.init.orthogonal_(self.up.weight, gain=0.1 * max(1.0, math.sqrt(rank / dim)))

    def forward(self, x: Tensor) -> Tensor:
        h = self.down(x)
        return self.up(h if self.activation is None else self.activation(h))


class HeadGroupNorm(nn.GroupNorm):
    """GroupNorm over [..., heads, head_dim] with one group per head, the group count read from
    the input: a tensor-parallel rank normalises only the heads it holds."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.flatten(0, -3).flatten(-2), x.shape[-2], self.weight, self.bias, self.eps).view_as(x)


def depth_ratios(layer_idx: int, n_layers: int) -> tuple[float, float]:
    """The official (l / (L - 1), 1 - l / L) that shape every per-channel init."""
    return layer_idx / max(n_layers - 1, 1), 1.0 - layer_idx / n_layers


def first_rwkv7_block(cfg: ModelConfig) -> int:
    return cfg.mixer_names.index("rwkv7")


class RWKV7Config(MixerConfig):
    """RWKV-7 time-mix (docs/layers.md section 4); LoRA ranks None = the official rule
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

    def check_shapes(self, d_model: int) -> None:
        if d_model % self.head_dim:
            raise ValueError(f"d_model ({d_model}) must be divisible by mixers.rwkv7.head_dim ({self.head_dim})")

    def tp_divides(self, d_model: int) -> dict[str, int]:
        """Whole heads per rank; the channel-mix's hidden width must split too (whenever it is on,
        also with model.mlp none, where no block builds it)."""
        divides = {"RWKV-7 heads (d_model / mixers.rwkv7.head_dim)": d_model // self.head_dim}
        if self.channel_mix:
            divides["mixers.rwkv7.channel_mix_hidden"] = self.channel_mix_hidden or 4 * d_model
        return divides


class RWKV7(Mixer):
    """Tensor parallelism splits it by head: r, k, v colwise; each LoRA's first matrix (model
    width -> rank) replicated, its second colwise; the vectors acting on head channels (w0, a0,
    v0, k_k, k_a, r_k) and the per-head GroupNorm by channel. The token-shift mix `mu` acts on the
    model width: replicated. Every rank holds the same channels in every R block, so
    carry["v_first"] lines up. The replicated parameters see replicated activations: every rank
    computes their whole gradient."""

    carry_writes = ("v_first",)
    tp_plan = TensorParallelPlan(
        colwise=("r_proj", "k_proj", "v_proj", "*_lora.up"),
        sharded={"o_norm": ("weight", "bias"), "": ("w0", "a0", "v0", "k_k", "k_a", "r_k")},
        replicated={"*_lora.down": ("weight",), "": ("mu",)},
    )
    cp_plan = ContextParallelPlan(transition="matrix", shift=1)  # diagonal plus rank one per token

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        c, d = cfg.mixers.rwkv7, cfg.d_model
        self.cfg = c
        self.layer_idx, self.n_layers = layer_idx, cfg.n_layers
        self.is_first = layer_idx == first_rwkv7_block(cfg)
        self.head_dim = c.head_dim
        heads = d // c.head_dim
        factor = c.head_dim / 64
        self.mu = nn.Parameter(torch.empty(len(MIX_EXPONENTS), d))  # token-shift mix of x_r, x_w, x_k, x_v, x_a, x_g
        self.r_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.w0 = nn.Parameter(torch.empty(d))
        self.w_lora = LoRA(d, c.decay_rank or lora_rank(2.5 * factor, d), torch.tanh)
        self.a0 = nn.Parameter(torch.empty(d))
        self.a_lora = LoRA(d, c.a_rank or lora_rank(2.5 * factor, d))
        self.v0 = None if self.is_first else nn.Parameter(torch.empty(d))
        self.v_lora = None if self.is_first else LoRA(d, c.v_rank or lora_rank(1.7 * factor, d))
        self.g_lora = LoRA(d, c.gate_rank or lora_rank(5.0, d), torch.sigmoid)
        self.k_k = nn.Parameter(torch.empty(d))
        self.k_a = nn.Parameter(torch.empty(d))
        self.r_k = nn.Parameter(torch.empty(heads, c.head_dim))
        self.o_norm = HeadGroupNorm(heads, d, eps=c.norm_eps)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official RWKV-7 init (docs/layers.md 4d)."""
        d, N = self.w0.numel(), self.head_dim
        r01, r10 = depth_ratios(self.layer_idx, self.n_layers)
        n = torch.arange(d, dtype=torch.float64)
        ddd = n / d
        linear = n / max(d - 1, 1) - 0.5
        z = ((n % N) - (N - 1) / 2) / max((N - 1) / 2, 1)
        zigzag = z * z.abs()
        www = -6 + 6 * (n / max(d - 1, 1)) ** (1 + r01**0.3)
        self.mu.copy_(torch.stack([1 - ddd ** (e * r10) for e in MIX_EXPONENTS]))
        self.w0.copy_(www + 0.5 + 2.5 * zigzag)
        self.a0.copy_(-0.19 + 0.3 * zigzag + 0.4 * linear)
        self.k_k.copy_(0.71 - 0.1 * linear)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        for proj, bound in [(self.r_proj, 0.5), (self.k_proj, 0.05), (self.v_proj, 0.5)]:
            nn.init.uniform_(proj.weight, -bound / math.sqrt(d), bound / math.sqrt(d))
        nn.init.zeros_(self.out_proj.weight)
        for lora in (self.w_lora, self.a_lora, self.g_lora):
            lora.reset_parameters()
        vectors = [self.mu, self.w0, self.a0, self.k_k, self.k_a, self.r_k]
        if self.v_lora is not None:
            self.v0.copy_(0.73 - 0.4 * linear)
            self.v_lora.reset_parameters()
            vectors.append(self.v0)
        self.o_norm.weight.fill_(((self.layer_idx + 1) / self.n_layers) ** 0.7)
        nn.init.zeros_(self.o_norm.bias)
        no_weight_decay(*vectors)

    def mix_values(self, v: Tensor, x_v: Tensor, carry: dict | None, shape: torch.Size) -> Tensor:
        """The value residual: the first R block stores v ([B, T, channels of the heads held]),
        later ones mix the stored v in."""
        if self.is_first:
            if carry is not None:
                carry["v_first"] = v.reshape(*shape[:-1], -1)
            return v
        if carry is None or "v_first" not in carry:
            raise ValueError(f"R block {self.layer_idx} needs carry['v_first'] from the first R block")
        return torch.lerp(v, carry["v_first"].reshape(v.shape), torch.sigmoid(self.v0 + self.v_lora(x_v)))

    def forward(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None, carry: dict | None = None
    ) -> Tensor:
        flat = as_one_sequence(x, cu_seqlens, cache)
        previous = token_shift(flat, cu_seqlens, cache, "shift")
        x_r, x_w, x_k, x_v, x_a, x_g = torch.lerp(flat[..., None, :], previous[..., None, :], self.mu).unbind(-2)
        r, k = self.r_proj(x_r), self.k_proj(x_k)
        v = self.mix_values(self.v_proj(x_v), x_v, carry, x.shape)
        log_w = -LOG_DECAY_SCALE * torch.sigmoid(self.w0 + self.w_lora(x_w))
        a = torch.sigmoid(self.a0 + self.a_lora(x_a))  # in-context learning rate
        kappa = F.normalize((k * self.k_k).unflatten(-1, (-1, self.head_dim)), dim=-1)
        k = k * (1 + (a - 1) * self.k_a)
        r, log_w, k, v, a = (t.unflatten(-1, (-1, self.head_dim)) for t in (r, log_w, k, v, a))
        y = cached_recurrence(
            chunk_rwkv7, r, log_w, k, v, -kappa, kappa * a,
            scale=1.0, chunk_size=self.cfg.chunk_size, cu_seqlens=cu_seqlens, cache=cache, lower_bound=-LOG_DECAY_SCALE,
            transition=self.cp_plan.transition,
        )
        y = self.o_norm(y) + (r * k * self.r_k).sum(-1, keepdim=True) * v
        return self.out_proj((y.flatten(-2) * self.g_lora(x_g)).reshape(*x.shape[:-1], -1))

    def flops_per_token(self, seq_len: int) -> float:
        heads = self.r_k.shape[0]
        core = dplr_recurrence_flops(min(self.cfg.chunk_size, seq_len), self.head_dim, self.head_dim)
        return projection_flops(self) + heads * core


class RWKV7ChannelMix(nn.Module):
    """RWKV's channel-mix, the MLP of R blocks: W_v relu(W_k(x + (x_{t-1} - x) o mu_k))^2. Its
    token shift stops at document starts and continues from the decode cache like the time-mix.
    Under tensor parallelism the token-shift mix mu_k acts on the model width: replicated."""

    tp_plan = TensorParallelPlan(colwise=("up_proj",), rowwise=("down_proj",), replicated={"": ("mu_k",)})

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d = cfg.d_model
        hidden = cfg.mixers.rwkv7.channel_mix_hidden or 4 * d
        self.layer_idx, self.n_layers = layer_idx, cfg.n_layers
        self.mu_k = nn.Parameter(torch.empty(d))
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official: mu_k = 1 - (i / d)^(r10^4), W_k ~ U(+-0.5 / sqrt(d)), W_v = 0."""
        d = self.mu_k.numel()
        _, r10 = depth_ratios(self.layer_idx, self.n_layers)
        self.mu_k.copy_(1 - (torch.arange(d, dtype=torch.float64) / d) ** (r10**4))
        nn.init.uniform_(self.up_proj.weight, -0.5 / math.sqrt(d), 0.5 / math.sqrt(d))
        nn.init.zeros_(self.down_proj.weight)
        no_weight_decay(self.mu_k)

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None) -> Tensor:
        flat = as_one_sequence(x, cu_seqlens, cache)
        previous = token_shift(flat, cu_seqlens, cache, "channel_mix_shift")
        hidden = torch.relu(self.up_proj(torch.lerp(flat, previous, self.mu_k))).square()
        return self.down_proj(hidden.reshape(*x.shape[:-1], -1))

    def flops_per_token(self) -> float:
        return 2.0 * 2 * self.up_proj.in_features * self.up_proj.out_features


def rwkv7_mlp(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """R blocks' MLP: the channel-mix, or SwiGLU with mixers.rwkv7.channel_mix false."""
    return RWKV7ChannelMix(cfg, layer_idx) if cfg.mixers.rwkv7.channel_mix else SwiGLU(cfg, layer_idx)


SPEC = MixerSpec(RWKV7Config, RWKV7, mlp=rwkv7_mlp)
