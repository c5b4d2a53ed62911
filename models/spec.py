"""What a mixer declares to the rest of ebb, once, in its own file.

A mixer's file holds its config class (a `MixerConfig`: its section under `model.mixers`, with
its own shape checks), its module (a `Mixer`) and `SPEC = MixerSpec(config, module, mlp)`. One
line in `models/mixers/__init__.py` maps a pattern character to the file. From the module the
framework reads:
- `forward(x, cu_seqlens=None, cache=None, carry=None)`: x [B, T, d_model] -> [B, T, d_model];
  `cu_seqlens` packs documents, `cache` makes the call a prefill or decode step, `carry` is the
  dict of tensors that cross blocks (and pipeline stages);
- `carry_writes`: the carry entries its forward writes;
- `flops_per_token(seq_len)`: forward FLOPs counted from its own algorithm;
- `tp_plan`: how tensor parallelism splits it, as data (`TensorParallelPlan`) that
  `parallel/tp/` turns into DTensor styles; the mixer itself never sees torch.distributed;
- `cp_plan`: that it runs under context parallelism and how its recurrent state passes between
  pieces (`ContextParallelPlan`, models/context.py); `parallel/context_parallel.py` refuses a
  model with a mixer that declares none.
A mixer that transformers has a class for also declares, in `MixerSpec.hf`, how a model made
only of it maps onto that class (`HFNative`: names, layouts, config), for the native Hugging Face
export and import (`python -m checkpoint.convert`). Every mixer exports in the remote-code format,
which keeps ebb's own parameter names, without one.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from common.config import Strict
from models.context import Transition

ParameterNames = Mapping[str, tuple[str, ...]]  # module path within the layer ('' = itself) -> parameter names


@dataclass(frozen=True)
class TensorParallelPlan:
    """How tensor parallelism splits a layer (a mixer or an MLP) over the ranks.

    Module paths are relative to the layer and may be fnmatch globs (`memories.*`); a path that
    matches nothing in a built layer is skipped (optional pieces). Every parameter of the layer
    must be named by exactly one entry: `parallel/tp/` refuses a layer with an unplanned one.
    - `colwise`: Linear children split by output feature (per-head projections); their outputs
      hold this rank's heads.
    - `rowwise`: Linear children split by input feature, whose outputs are summed over ranks
      (the projection back to the residual stream).
    - `sharded`: parameters used directly, split on dim 0 (per head or per channel).
    - `replicated`: whole on every rank, applied to replicated activations: every rank computes
      their whole gradient.
    - `summed`: whole on every rank but applied to this rank's heads only: their gradients are
      summed over the ranks.
    - `routers`: top-k routers, replicated; the gradient of their chosen probabilities (which
      weight this rank's heads' read-outs) is summed over the ranks.
    """

    colwise: tuple[str, ...] = ()
    rowwise: tuple[str, ...] = ("out_proj",)
    sharded: ParameterNames = field(default_factory=dict)
    replicated: ParameterNames = field(default_factory=dict)
    summed: ParameterNames = field(default_factory=dict)
    routers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContextParallelPlan:
    """What context parallelism (each rank a contiguous piece of every sequence) needs of a
    mixer. Boundaries other than the state are crossed by the shared helpers the mixer already
    calls: short convolutions (`conv_features`, `segment_conv`) take a halo of the previous
    inputs, token shifts the previous token, and attention reads the earlier keys itself.
    - `transition`: how its chunked op's state transition over a piece is summarised (None: no
      recurrent state): "matrix" (K x K per head, any op linear in its state) or "decay" (a
      scalar per head: simple GLA's log-gate `g`). The mixer hands it to `cached_recurrence`.
    - `conv`: the key of its section that sets the width of the short convolutions that read the
      previous piece (a halo of width - 1 tokens, which a piece must hold; `use_short_conv`, where
      the section has it, turns them off); None: none that do.
    - `shift`: the tokens before a piece its token shift reads (RWKV's: 1)."""

    transition: Transition | None = None
    conv: str | None = None
    shift: int = 0

    def halo(self, section: Any) -> int:
        """The tokens of the previous piece this mixer reads, under its config section."""
        convs = self.conv is not None and getattr(section, "use_short_conv", True)
        return max(getattr(section, self.conv) - 1 if convs else 0, self.shift)


class MixerConfig(Strict):
    """A mixer's section under `model.mixers`."""

    def check_shapes(self, d_model: int) -> None:
        """Raise ValueError naming the key when the mixer cannot be built at this model width."""

    def tp_divides(self, d_model: int) -> dict[str, int]:
        """The counts tensor parallelism splits, by the key (or expression) that sets them: `tp`
        must divide each."""
        return {}


class Mixer(nn.Module):
    """Base of every mixer: built as `Mixer(cfg: ModelConfig, layer_idx)`; see the module docs."""

    tp_plan: ClassVar[TensorParallelPlan]
    cp_plan: ClassVar[ContextParallelPlan | None] = None
    carry_writes: tuple[str, ...] = ()

    def forward(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None, carry: dict | None = None
    ) -> Tensor:
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> float:
        raise NotImplementedError


MLPBuilder = Callable[..., nn.Module]  # (cfg: ModelConfig, layer_idx) -> the MLP
TensorLayout = Callable[[Any, str, Tensor], Tensor]  # (model: ModelConfig, ebb parameter name, tensor) -> tensor


def same_layout(model: Any, name: str, tensor: Tensor) -> Tensor:
    return tensor


@dataclass(frozen=True)
class HFNative:
    """How a model whose every block is this mixer is an architecture of the library that defines
    it (transformers, or fla, which registers its classes with transformers' Auto classes when
    imported), so that it exports to (`to-hf --format native`) and imports from (`from-hf`) that
    class's format with no remote code. `models/hf/native.py` reads it.

    - `architectures`: the class names it exports to and imports from;
    - `model_type`: for a class outside transformers (fla's), its config's model_type: the
      config is written from `config` alone, so exporting needs no fla;
    - `hybrid_with`: the other mixers whose blocks the class also holds (fla's attention layers),
      which `config`, `model_config` and `names` then cover too;
    - `architecture(model)`: the class for this ModelConfig, or ValueError (one line) naming what
      the class cannot express;
    - `config(model)`: that class's config entries (vocabulary, width, depth, norms, tying; RoPE
      as `rope_theta`);
    - `model_config(hf)`: back from a transformers config dict to the ebb `model` section (a dict),
      or ValueError naming what ebb cannot express;
    - `names`: every ebb parameter name -> the transformers one, `{i}` standing for the block index
      (an ebb name missing here cannot be exported);
    - `to_hf`, `from_hf`: a tensor's layout change by its ebb name (Mamba2's group-major rows),
      one tensor at a time so that conversion streams.
    """

    architectures: tuple[str, ...]
    architecture: Callable[[Any], str]  # (model: ModelConfig) -> class name
    config: Callable[[Any], dict[str, Any]]  # (model: ModelConfig) -> config entries
    model_config: Callable[[Mapping[str, Any]], dict[str, Any]]
    names: Mapping[str, str]
    to_hf: TensorLayout = same_layout
    from_hf: TensorLayout = same_layout
    model_type: str | None = None
    hybrid_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class MixerSpec:
    """A mixer as the framework sees it. `mlp` builds the block's MLP when the mixer brings its
    own (RWKV-7's channel-mix), None for the model's SwiGLU. Every MLP is built as
    `mlp(cfg, layer_idx)`, runs as `forward(x, cu_seqlens=None, cache=None)` and has a `tp_plan`.
    `hf`: the transformers class a model of only this mixer is (`HFNative`), None where there is
    none (such models export in the remote-code format alone)."""

    config: type[MixerConfig]
    module: type[Mixer]
    mlp: MLPBuilder | None = None
    hf: HFNative | None = None
