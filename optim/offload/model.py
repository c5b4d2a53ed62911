"""Which subgroups go to the accelerator: the schedule and the performance model choosing it.

Schedule: with `k >= 1`, subgroup `x` is updated on the accelerator when `x % k == k - 1` (every
k-th, the last of each run of k), the others on the host; `k = 1` sends every subgroup to the
accelerator, and `k = 0` none (all on the host).

Model. Per run of k subgroups of S elements, the host updates k - 1 of them, taking (k - 1) S / H
seconds (H: host update throughput, elements/s). Meanwhile, on the accelerator side:
- host-to-device, the next device subgroup's state, `STATE_BYTES` = 12 bytes an element (fp32
  master, exp_avg, exp_avg_sq), and the k - 1 host subgroups' updated parameters, `param_bytes`
  an element;
- device-to-host, the previous device subgroup's state written back, 12 bytes an element (its
  updated parameter is written on the device);
- the device update of the subgroup, S / D seconds (D: device update throughput).
The links are full duplex at B bytes/s each way, so the time to hide is the longest of the
three. The chosen k is the smallest whose transfers and device update hide behind the host's
k - 1 updates; when none up to the number of subgroups does, everything stays on the host (0).
"""
from __future__ import annotations

from dataclasses import dataclass

STATE_BYTES = 12  # fp32 master + two fp32 moments, per element, each way


@dataclass(frozen=True)
class Rates:
    """Measured at start-up: host and device update throughput (elements/s), transfer bandwidth
    per direction (bytes/s)."""

    host: float
    device: float
    bandwidth: float


def on_device(index: int, k: int) -> bool:
    """Whether subgroup `index` is updated on the accelerator under `k` (see the module doc)."""
    return k >= 1 and index % k == k - 1


def hidden(k: int, rates: Rates, subgroup_numel: int, param_bytes: int) -> bool:
    """Whether one device subgroup's transfers and update hide behind k - 1 host updates."""
    if k < 2:
        return False
    host_time = (k - 1) * subgroup_numel / rates.host
    to_device = (STATE_BYTES + (k - 1) * param_bytes) * subgroup_numel / rates.bandwidth
    to_host = STATE_BYTES * subgroup_numel / rates.bandwidth
    return max(to_device, to_host, subgroup_numel / rates.device) <= host_time


def choose_k(rates: Rates, subgroup_numel: int, n_subgroups: int, param_bytes: int) -> int:
    """The smallest k in 2..n_subgroups whose device work is `hidden`; 0 (all on the host) if none."""
    return next((k for k in range(2, n_subgroups + 1) if hidden(k, rates, subgroup_numel, param_bytes)), 0)
