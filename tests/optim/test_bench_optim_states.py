"""bench/optim_states.py in its tiny mode, so that it cannot rot: both parameter sets, ebb's
codecs and bitsandbytes' AdamW8bit (torchao's optimizers compile per tensor shape, which takes
longer than a test should: the bench itself runs them)."""
import importlib.util
import json

import pytest

from tests.runs import load_bench

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_tiny_bench_reports_every_optimizer_on_both_sets(tmp_path, capsys):
    bench = load_bench("optim_states")
    out = tmp_path / "bench.json"
    report = bench.main(["--tiny", "--only", "ebb_fp32,ebb_bf16,ebb_int8,ebb_fp8,bnb_adamw8bit", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    for set_name in ("flat", "model"):
        rows = report["sets"][set_name]["rows"]
        assert list(rows) == ["torch_fused", "ebb_fp32", "ebb_bf16", "ebb_int8", "ebb_fp8", "bnb_adamw8bit"]
        assert all(row["step_ms"] > 0 and (row["peak_mb"] is None or row["peak_mb"] >= 0) for row in rows.values())
        assert rows["torch_fused"]["vs_torch_fused"] == 1.0 and "vs_library" in rows["ebb_int8"]
        assert rows["bnb_adamw8bit"]["bytes_per_quantised_param"] == pytest.approx(2 + 8 / 256)
        assert f"{set_name} set" in printed
    flat = report["sets"]["flat"]["rows"]  # rows of whole blocks (the tiny model's rows of 64 pay a scale per 64)
    assert flat["ebb_int8"]["bytes_per_quantised_param"] == pytest.approx(2 + 8 / 256)
    assert flat["ebb_fp8"]["bytes_per_quantised_param"] == pytest.approx(2 + 24 / 128)
