import pytest
import torch

from models.model import HybridLM
from pretrain.generate import generate, sample_next
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops are dominated by thread hand-offs; the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(one_thread) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(tiny_model_config("MTG*", init_std=0.5)).double().eval()  # float64: near-tied logits cannot flip the argmax


def greedy_by_full_forwards(model: HybridLM, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_decoding_from_the_cache_equals_full_forwards(model):
    prompt = [5, 17, 3, 42, 9, 11, 60]
    expected = greedy_by_full_forwards(model, prompt, 12)
    assert len(set(expected)) > 1  # a constant continuation would prove little
    assert generate(model, prompt, max_new_tokens=12) == expected


def test_generation_stops_before_eos_and_respects_vocab_size(model):
    prompt = [1, 2, 3]
    greedy = generate(model, prompt, max_new_tokens=8)
    assert generate(model, prompt, max_new_tokens=8, eos_id=greedy[2]) == greedy[:2]
    restricted = generate(model, prompt, max_new_tokens=8, temperature=1.0, vocab_size=4, generator=torch.Generator().manual_seed(0))
    assert len(restricted) == 8 and all(t < 4 for t in restricted)


def test_top_k_sampling():
    logits = torch.tensor([0.0, 3.0, 2.0, -1.0])
    draws = {sample_next(logits, 1.0, 2, torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {1, 2}
    assert sample_next(logits, 5.0, 1, None) == 1 == sample_next(logits, 0.0, None, None)
