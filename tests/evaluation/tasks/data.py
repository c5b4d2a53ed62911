"""The local data of the test tasks (JSON lines beside this file), as lm-eval's `custom_dataset`:
no hub, no datasets cache."""
from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _split(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**kwargs) -> datasets.DatasetDict:
    return _split("multiple_choice.jsonl")


def perplexity(**kwargs) -> datasets.DatasetDict:
    return _split("perplexity.jsonl")


def completion(**kwargs) -> datasets.DatasetDict:
    return _split("completion.jsonl")


def missing(**kwargs) -> datasets.DatasetDict:
    """A task whose data file is not there (`ebb_missing`: the tests' task that fails to load)."""
    return _split("missing.jsonl")
