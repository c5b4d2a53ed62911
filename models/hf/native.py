"""ebb models as Hugging Face models: which names, layouts and config each format has.

Two formats (`python -m checkpoint.convert to-hf --format remote|native`):
- remote: `EbbForCausalLM` (models/hf/modeling_ebb.py) with ebb's model code in the folder; the
  weights keep ebb's names under `model.`, any pattern;
- native: the class of the library that defines the architecture, where a model's blocks are
  all one mixer whose declaration has an `HFNative`, or that mixer and the ones its class holds
  beside it (`HFNative.hybrid_with`: fla's attention layers) (`MixerSpec.hf`: Mamba2 -> transformers'
  Mamba2ForCausalLM, attention -> Llama/Qwen2/Mistral, Gated DeltaNet, DeltaNet and Gated
  DeltaProduct -> fla's GatedDeltaNetForCausalLM, DeltaNetForCausalLM and
  GatedDeltaProductForCausalLM); the names, config and per-tensor layouts are that declaration's.

Everything here works one tensor at a time, so conversion can stream.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from torch import Tensor

from models.config import ModelConfig
from models.hf.names import BLOCK
from models.mixers import PATTERN, SPECS, spec_of
from models.spec import HFNative, same_layout

REMOTE_ARCHITECTURE = "EbbForCausalLM"
REMOTE_PREFIX = "model."
AUTO_MAP = {"AutoConfig": "configuration_ebb.EbbConfig", "AutoModelForCausalLM": "modeling_ebb.EbbForCausalLM"}


class FormatError(ValueError):
    """A model the asked format cannot express, or a Hugging Face model ebb cannot import (one line)."""


@dataclass(frozen=True)
class Format:
    """How one ebb model is written as a Hugging Face model."""

    architecture: str
    native: HFNative | None  # None: the remote-code format

    def hf_name(self, name: str) -> str:
        """The Hugging Face name of ebb parameter `name`."""
        if self.native is None:
            return REMOTE_PREFIX + name
        match = BLOCK.match(name)
        template = BLOCK.sub("blocks.{i}.", name) if match else name
        if template not in self.native.names:
            raise FormatError(f"{self.architecture} has no place for ebb parameter {name}")
        return self.native.names[template].format(i=match.group(1) if match else "")

    def to_hf(self, model: ModelConfig, name: str, tensor: Tensor) -> Tensor:
        return (self.native.to_hf if self.native else same_layout)(model, name, tensor)

    def from_hf(self, model: ModelConfig, name: str, tensor: Tensor) -> Tensor:
        return (self.native.from_hf if self.native else same_layout)(model, name, tensor)


def remote_format() -> Format:
    return Format(REMOTE_ARCHITECTURE, None)


def native_format(model: ModelConfig) -> Format:
    """The native class for `model` (its mixer's, or the mixer's whose class holds the others),
    or FormatError saying why there is none."""
    kinds = sorted(set(model.blocks), key=model.blocks.index)
    holders = [k for k in kinds if spec_of(k).hf is not None and {PATTERN[o] for o in kinds if o != k} <= set(spec_of(k).hf.hybrid_with)]
    if len(kinds) > 1 and not holders:
        names = ", ".join(PATTERN[k] for k in kinds)
        raise FormatError(f"pattern {model.pattern!r} mixes {names}: no native class holds it; export with --format remote")
    native = spec_of(holders[0] if holders else kinds[0]).hf
    if native is None:
        raise FormatError(f"no native class (transformers' or fla's) holds a model of {PATTERN[kinds[0]]} blocks; export with --format remote")
    try:
        return Format(native.architecture(model), native)
    except ValueError as exc:
        raise FormatError(f"the native format cannot express this model: {exc}") from None


def exported_names(model: ModelConfig, names: list[str]) -> Iterator[str]:
    """The ebb parameters an export writes, in order: all of them, less a tied head."""
    for name in names:
        if not (model.tie_embeddings and name == "lm_head.weight"):
            yield name


def hf_config(fmt: Format, model: ModelConfig, dtype: str, token_ids: Mapping[str, int | None]) -> Any:
    """The transformers config object of the export (`token_ids`: bos/eos/pad token ids)."""
    import transformers

    common = {"architectures": [fmt.architecture], **{k: v for k, v in token_ids.items() if v is not None}}
    if fmt.native is None:
        from models.hf.configuration_ebb import EbbConfig

        config = EbbConfig(ebb_model=model.model_dump(mode="json"), auto_map=AUTO_MAP, **common)
    else:
        config_class = (
            getattr(transformers, fmt.architecture).config_class if fmt.native.model_type is None
            else type(fmt.architecture + "Config", (transformers.PretrainedConfig,), {"model_type": fmt.native.model_type})
        )
        try:
            config = config_class(**fmt.native.config(model), **common)
        except (ValueError, TypeError) as exc:
            raise FormatError(f"{fmt.architecture} refuses this model's config: {exc}") from None
    setattr(config, "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype", dtype)
    return config


def import_format(hf: Mapping[str, Any]) -> tuple[Format, ModelConfig]:
    """The format of a Hugging Face config dict (config.json, with its class's defaults) and the
    ebb model config it describes; FormatError for an architecture ebb cannot import."""
    architecture = (hf.get("architectures") or [None])[0]
    if architecture == REMOTE_ARCHITECTURE or hf.get("model_type") == "ebb":
        return remote_format(), _validated(hf.get("ebb_model") or {}, REMOTE_ARCHITECTURE)
    for spec in SPECS.values():
        if spec.hf is not None and architecture in spec.hf.architectures:
            try:
                model = spec.hf.model_config(hf)
            except (KeyError, ValueError) as exc:
                raise FormatError(f"cannot import this {architecture}: {exc}") from None
            return Format(architecture, spec.hf), _validated(model, architecture)
    known = sorted({a for s in SPECS.values() if s.hf is not None for a in s.hf.architectures} | {REMOTE_ARCHITECTURE})
    raise FormatError(f"ebb cannot import architecture {architecture!r} (it imports {', '.join(known)})")


def _validated(model: Mapping[str, Any], architecture: str) -> ModelConfig:
    try:
        return ModelConfig.model_validate(model)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in ("model", *error["loc"]))
        raise FormatError(f"this {architecture} is not a valid ebb model: {key}: {error['msg'].removeprefix('Value error, ')}") from None
