"""A batch from the loader, packed rows and padding-free varlen, gives every document the logits it
gets alone, for every mixer (float64, 1e-10: packing is exact, not approximate)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.mixers import PATTERN
from models.model import HybridLM
from pretrain.config import load_config
from pretrain.data.loader import TokenBatches, tokenize_documents
from pretrain.data.tokenizer import ByteTokenizer
from tests.mixer_checks import assert_close64

REPO = Path(__file__).resolve().parents[2]
DOCS = [f"doc {i}:" + "xyzw"[i % 4] * (3 + 5 * i % 17) for i in range(12)]
SEQ_LEN, BATCH = 24, 2


def tiny_model(mixer: str) -> HybridLM:
    """One block of `mixer` with configs/all_mixers.yaml's options, in float64."""
    cfg = load_config(REPO / "configs/all_mixers.yaml", [f"model.pattern='{mixer}'", "model.d_model=64"])
    torch.manual_seed(0)
    return HybridLM(cfg.model).double().eval()


def loader_batch(varlen: bool):
    tokens = tokenize_documents(ByteTokenizer(), DOCS)
    batches = TokenBatches(tokens, SEQ_LEN, BATCH, seed=1, eos_id=ByteTokenizer.eos_id, varlen=varlen)
    return next(batches)


@pytest.mark.parametrize("varlen", [False, True], ids=["rows", "varlen"])
@pytest.mark.parametrize("mixer", sorted(PATTERN))
def test_each_packed_document_gets_the_logits_it_gets_alone(mixer, varlen):
    model, batch = tiny_model(mixer), loader_batch(varlen)
    bounds = batch.cu_seqlens.tolist()
    assert len(bounds) - 1 > batch.input_ids.shape[0]  # several documents share a row
    with torch.no_grad():
        packed = model(batch.input_ids, cu_seqlens=batch.cu_seqlens).flatten(0, 1)
        tokens = batch.input_ids.flatten()
        for start, end in zip(bounds[:-1], bounds[1:]):
            assert_close64(packed[start:end], model(tokens[None, start:end])[0])
