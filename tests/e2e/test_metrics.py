import importlib.util
import json

import pytest
import torch

from pretrain.config import ConfigError, LoggingConfig
from pretrain.peak_flops import gpu_peak_flops, measure_matmul_peak
from pretrain.metrics import MetricsLogger, Throughput

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


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"logging\.wandb is true but wandb is not installed"):
        MetricsLogger(tmp_path, LoggingConfig(wandb=True, progress=False), total_steps=1, start_step=0, run_config={})
