"""`python -m pretrain.evaluate`: ebb's in-process lm-eval `LM` on a checkpoint gives lm-eval's
`hf` model's scores and per-request results on the checkpoint's `to-hf` export; its packing is
exact; bad input is one line."""
from __future__ import annotations

import json
import math
import shutil
from collections import deque
from pathlib import Path

import pytest
import torch

from pretrain.evaluate import main as evaluate_main
from tests.evaluation.helpers import CHUNKS, MAX_LENGTH, PATTERN, TASKS, assert_one_error_line, checkpoint_and_export
from tests.hf.helpers import small_config, small_model

lm_eval = pytest.importorskip("lm_eval")  # in the dev extra: CI has it


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return checkpoint_and_export(tmp_path_factory.mktemp("evaluate"))


SCORED = ("ebb_mc", "ebb_ppl")  # multiple choice and perplexity (generation: see below)
LIMIT = "4"


def hf_results(folder: Path) -> dict:
    """lm-eval's `hf` model on the export (remote code)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {"pretrained": str(folder), "trust_remote_code": True, "dtype": "float32", "max_length": MAX_LENGTH, "device": "cpu"}
    return simple_evaluate(model="hf", model_args=args, tasks=list(SCORED), task_manager=TaskManager(include_path=str(TASKS)),
                           batch_size=4, limit=int(LIMIT), log_samples=True, bootstrap_iters=0)


def responses(results: dict, task: str) -> list:
    """Each document's model responses (loglikelihood, is-greedy; rolling loglikelihoods; texts), by document."""
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def flat(resps: list) -> list:
    out = []
    for item in resps:
        out += flat(item) if isinstance(item, (list, tuple)) else [item]
    return out


@pytest.mark.slow
def test_scores_and_loglikelihoods_equal_hf_on_the_export(exported: tuple[Path, Path], tmp_path: Path) -> None:
    run, folder = exported
    output = tmp_path / "ebb.json"
    status = evaluate_main([
        "--checkpoint", str(run), "--tasks", ",".join(SCORED), "--include-path", str(TASKS), "--max-length", str(MAX_LENGTH),
        "--batch-size", "4", "--limit", LIMIT, "--dtype", "float32", "--bootstrap-iters", "0", "--output", str(output), "--log-samples",
    ])
    assert status == 0
    ours, theirs = json.loads(output.read_text()), hf_results(folder)
    for task in SCORED:
        a, b = flat(responses(ours, task)), flat(responses(theirs, task))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            if isinstance(x, bool):
                assert x == y, (task, x, y)
            else:
                assert abs(float(x) - float(y)) <= 1e-5 * max(1.0, abs(float(y))), (task, x, y)
        for key, value in theirs["results"][task].items():
            if "," in key and isinstance(value, float):
                assert math.isclose(ours["results"][task][key], value, rel_tol=1e-5, abs_tol=1e-5), (task, key)
    # the rolling loglikelihoods took several windows, and the answers were not all alike
    assert max(len(s["doc"]["text"]) for s in ours["samples"]["ebb_ppl"]) > 2 * MAX_LENGTH
    assert len({x for x in flat(responses(ours, "ebb_mc")) if isinstance(x, float)}) > 1


def in_memory_lm(dtype: torch.dtype, batch_size: int, max_length: int):
    """EbbLM on a small model of every kind of recurrence and attention, with the byte tokenizer."""
    from pretrain.data.tokenizer import ByteTokenizer
    from pretrain.evaluation.lm import EbbLM

    model = small_model(small_config(PATTERN, CHUNKS)).to(dtype)
    return EbbLM(model, ByteTokenizer(), torch.device("cpu"), batch_size, max_length, progress=False)


def test_generation_is_greedy_decoding_cut_at_the_stop() -> None:
    """generate_until decodes prompts of one length together; each row's text is what greedy
    decoding of that prompt alone gives (`pretrain.generate`), cut before the first stop string."""
    from lm_eval.api.instance import Instance

    from pretrain.generate import generate

    lm = in_memory_lm(torch.float32, batch_size=4, max_length=MAX_LENGTH)
    prompts = ["def add(a, b):", "import os\nimport", "x = [1, 2]\ny"]  # two of 14 bytes: one batch
    options = {"until": ["b", "\n"], "max_gen_toks": 6, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, options), i) for i, p in enumerate(prompts)]
    texts = lm.generate_until(requests, disable_tqdm=True)
    tok = lm.ebb_tokenizer
    for prompt, text in zip(prompts, texts):
        greedy = tok.decode(generate(lm.model, tok.encode(prompt), 6, eos_id=tok.eos_id, vocab_size=tok.vocab_size))
        for stop in options["until"]:
            greedy = greedy.split(stop)[0]
        assert text == greedy
    assert any(texts)


def scored_one_by_one(lm, requests: list) -> list:
    return [lm._loglikelihood_tokens([r])[0] for r in requests]


def test_packed_rows_score_as_one_request_per_forward() -> None:
    """Packing many requests into each row (separate documents by cu_seqlens) and de-duplicating
    inputs changes nothing: float64, every kind of recurrence and attention, against one request
    per forward."""
    lm = in_memory_lm(torch.float64, batch_size=3, max_length=40)
    gen = torch.Generator().manual_seed(0)
    requests = []
    for n in (5, 17, 3, 30, 9, 9, 1, 24, 12, 2):
        tokens = torch.randint(0, 256, (n + 2,), generator=gen).tolist()
        requests.append((None, tokens[:n + 1], tokens[n + 1:]))
    requests.append((None, requests[1][1], [7, 8]))  # a shared context
    requests.append(requests[4])  # an exact repeat: scored once
    packed = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert lm.requests_scored == len(requests) - 1
    alone = scored_one_by_one(lm, requests)
    for (a, greedy_a), (b, greedy_b) in zip(packed, alone):
        assert abs(a - b) < 1e-10 and greedy_a == greedy_b


def test_rows_are_packed_longest_first_and_never_overflow() -> None:
    from pretrain.evaluation.lm import Scored, batches, pack_rows

    lengths = [30, 29, 20, 12, 10, 9, 5, 3, 2, 1, 1]
    pending = deque(Scored([0] * n, []) for n in lengths)
    rows = pack_rows(pending, batch_size=3)
    sizes = [[len(s.tokens) for s in row] for row in rows]
    assert len(rows) == 3 and all(sum(row) <= 30 for row in sizes)
    assert sizes[0] == [30] and sizes[1][0] == 29 and 1 in sizes[1]  # the gap filled from the short end
    taken = sorted(n for row in sizes for n in row)
    assert sorted(taken + [len(s.tokens) for s in pending]) == sorted(lengths)

    # packed only where that saves rows: alike lengths run one a row, batch_size rows a pass
    alike = [Scored([0] * n, []) for n in (30, 29, 28, 27, 26)]
    assert [[len(r) for r in rows] for rows in batches(alike, 2)] == [[1, 1], [1, 1], [1]]
    mixed = [Scored([0] * n, []) for n in lengths]
    assert sum(len(rows) for rows in batches(mixed, 2)) < len(lengths) / 1.5


@pytest.mark.slow
def test_an_unknown_task_is_one_line(exported: tuple[Path, Path], capfd: pytest.CaptureFixture) -> None:
    run, _ = exported
    assert evaluate_main(["--checkpoint", str(run), "--include-path", str(TASKS), "--tasks", "ebb_mc,no_such_task"]) == 2  # all of lm-eval's tasks indexed
    assert_one_error_line(capfd.readouterr().err, "evaluation task 'no_such_task' cannot be loaded: Spec 'no_such_task' is not a registered task")


def test_bad_input_is_one_line(exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, _ = exported

    def error(*args: str) -> str:
        assert evaluate_main(["--include-path", str(TASKS), *args]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1
        return lines[0]

    assert "no checkpoint" in error("--checkpoint", str(tmp_path), "--tasks", "ebb_mc")
    assert "not a directory of task YAMLs" in error("--checkpoint", str(run), "--tasks", "ebb_mc", "--include-path", str(tmp_path / "none"))
    assert "--tasks names no task" in error("--checkpoint", str(run), "--tasks", " , ")
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    shard = next((damaged / "checkpoints").rglob("*.distcp"))
    shard.write_bytes(bytes([shard.read_bytes()[0] ^ 1]) + shard.read_bytes()[1:])
    assert "checksum" in error("--checkpoint", str(next((damaged / "checkpoints").glob("step-*"))), "--tasks", "ebb_mc")
