"""Typed model configuration: the `model` section of a run config.

A hybrid stack is a pattern string, one character per block (`models/mixers/__init__.py` maps
each character to a mixer); spaces are ignored and `|` marks a pipeline-stage cut. Each mixer's
options live under `model.mixers.<name>`, a section its own file declares.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, create_model, field_validator, model_validator

from common.config import Strict
from models.mixers import PATTERN, SPECS

MixersConfig = create_model(
    "MixersConfig", __base__=Strict, **{name: (spec.config, spec.config()) for name, spec in SPECS.items()}
)


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
            if ch not in " |" and ch not in PATTERN:
                known = ", ".join(f"{c!r} {n}" for c, n in PATTERN.items())
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

    @property
    def mixer_names(self) -> list[str]:
        """The mixer of every block, by name."""
        return [PATTERN[ch] for ch in self.blocks]

    def mixer_config(self, name: str) -> Strict:
        return getattr(self.mixers, name)

    @model_validator(mode="after")
    def _shapes_divide(self) -> "ModelConfig":
        used = set(self.mixer_names)
        for name in (name for name in SPECS if name in used):
            self.mixer_config(name).check_shapes(self.d_model)
        return self
