"""transformers' face of an ebb model: `EbbForCausalLM` wraps ebb's own `HybridLM`.

`python -m checkpoint.convert to-hf --format remote` copies this file into the exported folder as
`modeling_ebb.py`, with ebb's model code beside it (`models/hf/remote_code.py` rewrites the
`models.` imports into relative ones), so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

runs the very code that trained the model: every mixer has one implementation, pure PyTorch, with
fla's kernels on CUDA where fla is installed (`models/ops`). The weights keep ebb's parameter names
under `model.`.

- `forward(input_ids, labels=None, cache=None, use_cache=None)`: logits, and with `labels` the
  next-token cross-entropy (labels are the inputs, shifted here; -100 is ignored), as ebb trains;
  `aux_loss` holds the routers' balance loss of MoM and SSE blocks (ebb adds it to the loss it
  differentiates; it is not in `loss`).
- `generate()`: the cache is an `EbbCache`, HybridLM's per-block decode state (recurrent states,
  convolution tails and token shifts for the linear mixers; keys and values, windowed where the
  attention is, for attention); each step feeds only the new tokens. Rows must not be padded (ebb
  has no padding mask); beam search is not supported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydantic  # noqa: F401  ebb's model configs; named here so that transformers asks for it when missing
import torch
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from models.config import ModelConfig
from models.hf.configuration_ebb import EbbConfig
from models.model import HybridLM

IGNORE_INDEX = -100
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


class EbbCache:
    """The decode state of every block (`HybridLM.new_cache()`: one dict per block, which its mixer
    and MLP fill and update in place) and how many tokens it has seen."""

    is_compileable = False
    is_croppable = False

    def __init__(self, model: HybridLM):
        self.blocks: list[dict] = model.new_cache()
        self.seen_tokens = 0
        self.is_linear = [block.kind != "*" for block in model.blocks]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.blocks)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        raise NotImplementedError("ebb's exported models do not support beam search (their routed mixers' caches are not per row)")


@dataclass
class EbbCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    cache: Any = None  # transformers 5's name; transformers 4 looks for past_key_values


def _no_padding(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("ebb's exported models take no padding (attention_mask has zeros): generate one prompt at a time, or prompts of one length")


class EbbForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = EbbConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_cache_class = False  # transformers 4: the cache is ours, made in forward
    if _TRANSFORMERS_5:
        _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    else:
        _tied_weights_keys = ["model.lm_head.weight"]

    def __init__(self, config: EbbConfig):
        super().__init__(config)
        self.model = HybridLM(ModelConfig.model_validate(config.ebb_model))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: ebb's modules initialise themselves when built (each mixer as its paper does)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() makes no cache of its own: forward makes an EbbCache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: EbbCache | None = None,
        past_key_values: EbbCache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> EbbCausalLMOutput | tuple:
        _no_padding(attention_mask)
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, EbbCache):
            cache = EbbCache(self.model) if use_cache else None
        carry: dict[str, torch.Tensor] = {}
        logits = self.model(input_ids, cache=None if cache is None else cache.blocks, carry=carry)
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().flatten(0, 1)
            targets = labels[:, 1:].flatten().to(logits.device)
            if num_items_in_batch is None:
                loss = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX)
            else:
                loss = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch
        output = EbbCausalLMOutput(loss=loss, logits=logits, aux_loss=carry.get("aux_loss"), cache=cache)
        if not _TRANSFORMERS_5:
            output["past_key_values"] = cache
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        cache: EbbCache | None = None,
        past_key_values: EbbCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Only the tokens the cache has not seen, with the cache (made by the first forward)."""
        _no_padding(attention_mask)
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, EbbCache):
            cache = None
        if cache is not None:
            input_ids = input_ids[:, cache.seen_tokens:]
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache}
