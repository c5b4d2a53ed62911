"""`to-hf --format native` of a Gated DeltaNet-only or DeltaNet-only model loads in fla's
GatedDeltaNetForCausalLM or DeltaNetForCausalLM with ebb's logits, and `from-hf` imports models
fla made, with fla's logits; fla runs on CPU
under Triton's interpreter (skipped unless TRITON_INTERPRET=1 and fla imports; see
tests/models/test_fla_wiring.py for the two commands). Short sequences in eval mode: fla's
fused recurrent kernels, float32."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import needs_interpreter  # first: it sets Triton's autotuner up before fla loads

pytestmark = needs_interpreter

from tests.hf.helpers import FLA_CASES, FLA_IDS, exported_native, from_hf, logits, reloaded, small_config, token_ids  # noqa: E402

TOL = 1e-4  # fla's kernels against ebb's chunked PyTorch ops, float32


@pytest.mark.parametrize("pattern, mixers, tie, architecture, model_type", FLA_CASES, ids=FLA_IDS)
def test_exported_models_run_in_fla_with_ebbs_logits(tmp_path: Path, pattern: str, mixers: dict, tie: bool, architecture: str, model_type: str) -> None:
    import fla  # noqa: F401  (registers fla's models with transformers' Auto classes)
    from transformers import AutoModelForCausalLM

    model = exported_native(tmp_path, small_config(pattern, mixers=mixers, norm_eps=1e-6, tie_embeddings=tie))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(theirs).__name__ == architecture
    ids = token_ids(shape=(2, 17))
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=0, atol=TOL)


ATTENTION_AT_1 = {"attn": [{"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 6, "rope_theta": 300.0}]}


@pytest.mark.parametrize(
    "kind, options",
    [
        ("G", {"num_heads": 2, "head_dim": 8, "expand_v": 2.0}),
        ("T", {"num_heads": 2, "expand_k": 0.5, "expand_v": 1.0, "use_gate": True}),
        ("G", {"num_heads": 2, "head_dim": 8, "expand_v": 1.0, **ATTENTION_AT_1}),
        ("P", {"num_heads": 2, "head_dim": 8, "expand_v": 2.0, "num_householder": 2, "use_forget_gate": True, "allow_neg_eigval": True}),
    ],
    ids=["gated_deltanet", "delta_net", "gated_deltanet-attention", "gated_deltaproduct"],
)
def test_a_model_made_by_fla_imports(tmp_path: Path, kind: str, options: dict) -> None:
    import fla.models as models

    config_class, model_class = {
        "G": (models.GatedDeltaNetConfig, models.GatedDeltaNetForCausalLM),
        "T": (models.DeltaNetConfig, models.DeltaNetForCausalLM),
        "P": (models.GatedDeltaProductConfig, models.GatedDeltaProductForCausalLM),
    }[kind]
    torch.manual_seed(0)
    config = config_class(vocab_size=96, hidden_size=32, num_hidden_layers=2, hidden_ratio=4, norm_eps=1e-6, tie_word_embeddings=True, **options)
    theirs = model_class(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs")
    from_hf(tmp_path / "theirs", tmp_path / "run")
    ours = reloaded(tmp_path / "run")
    assert ours.cfg.pattern == (kind + "*" if "attn" in options else kind * 2)
    assert ours.cfg.mlp_width == 256  # fla's GatedMLP width: 2/3 x 4 x 32, rounded up to 256
    ids = token_ids(vocab=96, shape=(2, 19))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=TOL)
