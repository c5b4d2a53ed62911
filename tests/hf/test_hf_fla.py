"""`to-hf --format native` of a Gated DeltaNet-only model loads in fla's GatedDeltaNetForCausalLM
with ebb's logits, and `from-hf` imports a model fla made, with fla's logits; fla runs on CPU
under Triton's interpreter (skipped unless TRITON_INTERPRET=1 and fla imports; see
tests/models/test_fla_wiring.py for the two commands). Short sequences in eval mode: fla's
fused recurrent kernels, float32."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import needs_interpreter  # first: it sets Triton's autotuner up before fla loads

pytestmark = needs_interpreter

from tests.hf.helpers import from_hf, logits, reloaded, save_checkpoint, small_config, small_model, to_hf, token_ids  # noqa: E402

TOL = 1e-4  # fla's kernels against ebb's chunked PyTorch ops, float32


@pytest.mark.parametrize(
    "options, tie", [({}, False), ({"num_v_heads": 4, "allow_neg_eigval": True}, True)], ids=["gdn", "gva-neg-eigval-tied"]
)
def test_exported_gated_deltanet_runs_in_fla_with_ebbs_logits(tmp_path: Path, options: dict, tie: bool) -> None:
    import fla  # noqa: F401  (registers fla's models with transformers' Auto classes)
    from transformers import AutoModelForCausalLM

    cfg = small_config("GGG", mixers={"gated_deltanet": {"norm_eps": 1e-6, **options}}, norm_eps=1e-6, tie_embeddings=tie)
    model = small_model(cfg)
    to_hf(save_checkpoint(tmp_path / "run" / "checkpoints", model), tmp_path / "hf", "--format", "native", "--dtype", "fp32")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(theirs).__name__ == "GatedDeltaNetForCausalLM"
    ids = token_ids(shape=(2, 17))
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=0, atol=TOL)


def test_a_gated_deltanet_made_by_fla_imports(tmp_path: Path) -> None:
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    torch.manual_seed(0)
    config = GatedDeltaNetConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8, expand_v=2.0, hidden_ratio=4,
        norm_eps=1e-6, tie_word_embeddings=True,
    )
    theirs = GatedDeltaNetForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs")
    from_hf(tmp_path / "theirs", tmp_path / "run")
    ours = reloaded(tmp_path / "run")
    assert ours.cfg.mlp_width == 256  # fla's GatedMLP width from hidden_ratio: 2/3 x 4 x 32, rounded up to 256
    ids = token_ids(vocab=96, shape=(2, 19))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=TOL)
