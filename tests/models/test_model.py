"""HybridLM: the whole stack keeps documents apart, decodes like it forwards, and counts FLOPs."""
import pytest
import torch

from models.model import HybridLM
from models.packing import with_row_starts
from tests.conftest import tiny_model_config


def small_model(pattern: str = "MTG*", **overrides) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(tiny_model_config(pattern, **overrides)).double().eval()


def test_row_starts_are_added_once():
    cu = torch.tensor([0, 3, 8, 12], dtype=torch.int32)
    assert with_row_starts(cu, batch=2, length=6).tolist() == [0, 3, 6, 8, 12]


def test_packed_documents_give_each_document_its_own_logits():
    model = small_model()
    lengths = [5, 9, 2, 8]  # two rows of 12: [5, 7 of the 9] | [2 of the 9, 2, 8]
    docs = [torch.randint(0, 64, (n,)) for n in lengths]
    stream = torch.cat(docs)
    with torch.no_grad():
        packed = model(stream.view(2, 12), cu_seqlens=torch.tensor([0, 5, 14, 16, 24])).view(24, -1)
        # the 9-token document is cut by the row boundary: its two halves are separate documents
        pieces = [docs[0], docs[1][:7], docs[1][7:], docs[2], docs[3]]
        alone = torch.cat([model(p.view(1, -1))[0] for p in pieces])
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=0)


def test_greedy_decoding_matches_full_forward():
    model = small_model("M*TG")
    ids = torch.randint(0, 64, (2, 13))
    cache = model.new_cache()
    with torch.no_grad():
        full = model(ids)
        steps = torch.cat([model(ids[:, :4], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(4, 13)], 1)
    torch.testing.assert_close(steps, full, atol=1e-10, rtol=0)


def test_tied_and_untied_heads():
    tied, untied = small_model(tie_embeddings=True), small_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params() - tied.num_params() == 64 * 32


def test_mixer_only_blocks_have_no_mlp():
    model = small_model("MM", mlp="none")
    assert all(block.mlp is None for block in model.blocks)
    logits = model(torch.randint(0, 64, (1, 9)))
    assert logits.shape == (1, 9, 64)


def test_flops_are_the_sum_of_the_parts():
    model = small_model()
    expected = sum(b.mixer.flops_per_token(128) + b.mlp.flops_per_token() for b in model.blocks) + 2 * 32 * 64
    assert model.flops_per_token(128) == pytest.approx(expected)
    assert model.flops_per_token(256) > model.flops_per_token(128)  # the attention block grows with T


def test_decoding_refuses_cu_seqlens():
    model = small_model()
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]), cache=model.new_cache())
