import importlib.util
import json

import pytest
import torch

from pretrain.config import ConfigError, LoggingConfig
from pretrain.errors import RunError
from pretrain.metrics import MetricsLogger, Progress, Throughput, read_records
from pretrain.peak_flops import gpu_peak_flops, measure_matmul_peak

QUIET = LoggingConfig(tensorboard=False, progress=False)


def test_gpu_peaks_are_looked_up_by_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA GeForce GTX 1080") is None


def test_matmul_peak_is_plausible_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    peak = measure_matmul_peak(size=256, repeats=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert 1e8 < peak < 1e14


def test_throughput_and_mfu():
    meter = Throughput(tokens_per_step=1000, train_flops_per_token=6e6, peak_flops=1e12)
    meter.add_step(0.5)
    meter.add_step(1.5)
    assert meter.take() == pytest.approx((1000.0, 0.006))
    assert Throughput(10, 1.0, None).take()[1] is None


def test_resuming_drops_records_of_the_interrupted_steps(tmp_path):
    logger = MetricsLogger(tmp_path, QUIET, total_steps=10, start_step=0, run_config={})
    for step in range(1, 6):
        logger.log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 1.0})
    logger.close()
    logger = MetricsLogger(tmp_path, QUIET, total_steps=10, start_step=3, run_config={})
    logger.log({"step": 4, "eval_loss": 0.5, "eval_ppl": 1.6})
    logger.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_non_finite_values_are_written_as_null(tmp_path):
    logger = MetricsLogger(tmp_path, QUIET, total_steps=10, start_step=0, run_config={})
    logger.log({"step": 1, "loss": float("nan"), "lr": 1e-3, "grad_norm": float("inf"), "tokens_per_s": 1.0, "skipped": True})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) == {
        "step": 1, "loss": None, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 1.0, "skipped": True
    }


def test_a_torn_last_line_is_dropped_and_a_bad_line_elsewhere_is_one_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_records(path) == [{"step": 1, "loss": 2.0}]
    assert capsys.readouterr().err == f"ebb: warning: {path}: dropped its last line, cut short by an interrupted write\n"
    path.write_text('{"step": 1, "loss": 2.0}\ngarbage\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl line 2 is not a metrics record; fix or move the file"):
        read_records(path)


def test_progress_is_plain_lines_off_a_terminal(capsys):
    progress = Progress(total=40, start=0, enabled=True)  # pytest's stderr is not a terminal
    for step in range(1, 41):
        progress.update({"step": step, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 100.0})
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 2/40 loss 0.5000 lr 1.00e-03 tok/s 100" and lines[-1].startswith("step 40/40 ")
    assert len(lines) == 20 and "\r" not in "".join(lines)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"logging\.wandb is true but wandb is not installed"):
        MetricsLogger(tmp_path, LoggingConfig(wandb=True, progress=False), total_steps=1, start_step=0, run_config={})
