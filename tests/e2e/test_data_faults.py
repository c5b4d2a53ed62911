"""Bad data and tokenizer input, injected for real, as a user meets it on the command line: one
`error:` line, exit code 2, and nothing already written lost."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.runs import REPO, SMALL_RUN, assert_one_error, cli

pytestmark = pytest.mark.slow  # seconds each (subprocess runs): CI runs them, the fast loop skips them


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_malformed_tokenizer_file_is_one_line(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": ')
    result = cli("pretrain.train", *SMALL_RUN, f"train.run_dir={tmp_path / 'run'}", f"data.tokenizer={tokenizer}")
    assert_one_error(result, f"data.tokenizer: cannot load {tokenizer}: ")


def test_an_unreachable_hub_dataset_is_one_line_and_quick(tmp_path):
    """The hub at a closed port: nothing is retried, and nothing is in the cache."""
    began = time.monotonic()
    result = cli(
        "pretrain.train", *SMALL_RUN, f"train.run_dir={tmp_path / 'run'}", "data.path=hf:nosuchorg/nosuchdataset",
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_error(result, "data source nosuchorg/nosuchdataset: cannot load it with datasets (the Hugging Face Hub cannot be reached")
    assert time.monotonic() - began < 60


def preprocess(*args: str):
    return cli("pretrain.data.preprocess", *args)


def test_preprocess_refuses_bad_arguments_before_writing_anything(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    assert_one_error(preprocess("--input", str(corpus), "--output", str(tmp_path / "out" / "d"), "--workers", "0"), "--workers must be at least 1 (got 0)")
    assert not (tmp_path / "out").exists()
    assert_one_error(preprocess("--input", str(corpus), "--output", str(corpus / "d")), f"--output {corpus / 'd'}: {corpus} is a file, not a directory")


def test_a_failed_preprocess_leaves_the_earlier_dataset_as_it_was(tmp_path):
    corpus, empty = tmp_path / "corpus.jsonl", tmp_path / "empty.jsonl"
    corpus.write_text('{"text": "hello"}\n{"text": "world"}\n')
    empty.write_text('{"text": ""}\n')
    out = tmp_path / "out"
    assert preprocess("--input", str(corpus), "--output", str(out / "d")).returncode == 0
    before = files_of(out)
    assert sorted(before) == ["d.bin", "d.ebb.json", "d.idx"]
    assert_one_error(preprocess("--input", str(empty), "--output", str(out / "d")), "holds no non-empty documents")
    assert files_of(out) == before  # no partial files, nothing replaced


def test_the_preprocess_example_output_is_ignored_by_git_and_the_data_package_is_not():
    """The README's `--output data/web` writes under data/ at the repository root."""
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert ignored("data/web.bin") and ignored("data/web.ebb.json")
    assert not ignored("pretrain/data/config.py") and not ignored("tests/data/test_data.py")
