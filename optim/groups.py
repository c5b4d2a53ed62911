"""Parameter groups from the config: weight decay and its exclusions, per-tensor state dtype
(threshold, embeddings), and the `optim.overrides` globs. Every decision is a function of the
parameter's name, global shape and the config, never of the layout, so a checkpoint's states
have the same codecs under every layout."""
from __future__ import annotations

import fnmatch
from typing import Any, Sequence

from torch import nn

from optim.config import OptimConfig, ParamGroupOverride


def wants_weight_decay(param: nn.Parameter) -> bool:
    """Matrices decay; norms, biases (ndim < 2) and parameters marked `_no_weight_decay` (A_log,
    dt_bias, D, RWKV-7's per-channel vectors) do not."""
    return param.ndim >= 2 and not getattr(param, "_no_weight_decay", False)


def embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def state_dtype_for(param: nn.Parameter, wanted: str, cfg: OptimConfig, is_embedding: bool) -> str:
    """`wanted`, unless the tensor (its global element count: a DTensor's, not its shard's) is
    small, or an embedding kept in fp32 by option: then fp32."""
    if param.numel() < cfg.min_quant_numel or (is_embedding and cfg.fp32_embedding_states):
        return "fp32"
    return wanted


def first_override(name: str, overrides: Sequence[ParamGroupOverride]) -> ParamGroupOverride | None:
    return next((o for o in overrides if fnmatch.fnmatchcase(name, o.params)), None)


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """One group per distinct (weight decay, state dtype, lr scale); the plain decay and no-decay
    groups come first (group 0 carries the unscaled lr that the trainer logs)."""
    embeddings = embedding_weights(model)
    groups: dict[tuple[float, str, float], list[nn.Parameter]] = {
        (cfg.weight_decay, cfg.state_dtype, 1.0): [], (0.0, cfg.state_dtype, 1.0): []
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        override = first_override(name, cfg.overrides)
        decay = cfg.weight_decay if override is None or override.weight_decay is None else override.weight_decay
        wanted = cfg.state_dtype if override is None or override.state_dtype is None else override.state_dtype
        key = (
            decay if wants_weight_decay(param) else 0.0,
            state_dtype_for(param, wanted, cfg, id(param) in embeddings),
            1.0 if override is None else override.lr_scale,
        )
        groups.setdefault(key, []).append(param)
    return [
        {"params": params, "weight_decay": decay, "state_dtype": dtype, "lr": cfg.lr * lr_scale}
        for (decay, dtype, lr_scale), params in groups.items() if params
    ]
