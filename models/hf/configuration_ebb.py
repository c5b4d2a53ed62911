"""transformers' config for an ebb model exported in the remote-code format.

It holds ebb's own `model` section (`ebb_model`, the ModelConfig as a dict) and derives from it the
few entries transformers reads itself (vocabulary, width, depth, embedding tying). This file is
copied as it is into every exported folder (`models/hf/remote_code.py`), next to
`modeling_ebb.py` and ebb's model code.
"""
from transformers import PretrainedConfig


class EbbConfig(PretrainedConfig):
    model_type = "ebb"

    def __init__(self, ebb_model=None, **kwargs):
        model = dict(ebb_model or {})
        kwargs.setdefault("tie_word_embeddings", model.get("tie_embeddings", True))
        super().__init__(**kwargs)
        self.ebb_model = model
        self.vocab_size = model.get("vocab_size")
        self.hidden_size = model.get("d_model")
        pattern = model.get("pattern", "")
        self.num_hidden_layers = sum(ch not in " |" for ch in pattern)
