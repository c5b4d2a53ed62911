"""The host-side AdamW of offloaded subgroups, by `optim.offload.host_optimizer` name.

Both take the same lists (fp32 master pieces, their gradients and moments, each piece's step
count) and apply ebb's AdamW: decoupled weight decay, bias correction, the group's lr.
`torch` is torch's fused CPU kernel (`torch._fused_adamw_`, the kernel ebb's fp32 AdamW runs on
CPU, so an all-host run matches it exactly); `deepspeed` is DeepSpeed's CPU Adam (optional: a
JIT-built C++ op, imported only when asked for). A new one is a class and a line in
`HOST_OPTIMIZERS`.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Protocol

import torch
from torch import Tensor


class HostUnavailable(RuntimeError):
    """A host optimizer that cannot run here (not installed, its op does not build)."""


class HostAdamW(Protocol):
    name: str

    def update(
        self, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[Tensor],
        lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
    ) -> None:
        """One AdamW step in place; `steps` are 0-d float32 tensors already counting this step."""


class TorchHostAdamW:
    name = "torch"

    def update(self, params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps, weight_decay) -> None:
        torch._fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=betas[0], beta2=betas[1],
            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
        )


class DeepSpeedHostAdamW:
    """DeepSpeed's `cpu_adam` op in AdamW mode, one call per tensor (its own vectorised loop and
    OpenMP team). Building the op the first time takes a minute (ninja, g++)."""

    name = "deepspeed"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it found no GPU
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                from deepspeed.ops.op_builder import CPUAdamBuilder

                self.op = CPUAdamBuilder().load(verbose=False)
        except ImportError:
            raise HostUnavailable("DeepSpeed is not installed (pip install deepspeed)") from None
        except Exception as exc:  # the JIT build: compiler, headers, ninja
            text = str(exc).strip()
            raise HostUnavailable(f"DeepSpeed's CPU Adam op does not build here ({text.splitlines()[0] if text else type(exc).__name__})") from None
        self.id = id(self) & 0x7FFFFFFF
        self.op.create_adam(self.id, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False)

    def __del__(self) -> None:
        if hasattr(self, "op"):
            self.op.destroy_adam(self.id)

    def update(self, params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps, weight_decay) -> None:
        for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            self.op.adam_update(self.id, int(step.item()), lr, betas[0], betas[1], eps, weight_decay, True, p, g, m, v)


HOST_OPTIMIZERS: dict[str, type] = {"torch": TorchHostAdamW, "deepspeed": DeepSpeedHostAdamW}
HOST_CHOICES = ("auto", *HOST_OPTIMIZERS)  # what `optim.offload.host_optimizer` accepts


def build_host(name: str) -> HostAdamW:
    """The host optimizer `name` (raises `HostUnavailable` where it cannot run)."""
    return HOST_OPTIMIZERS[name]()
