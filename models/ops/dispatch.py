"""Which backend runs each recurrent op: fla's Triton kernel or ebb's PyTorch form (docs/design.md 4d).

`decide` is a pure function of the op, a `Platform` (CUDA, device capability, Triton and fla
versions), the input dtype and the key head dim, and `EBB_OPS_BACKEND` (auto | torch | fla). It
never picks a kernel known to refuse or miscompile its inputs:
- not on CUDA, or fla not importable: torch;
- float64: torch (fla has no float64 kernels); float32 into `chunk_delta_rule`: torch (fla asserts
  q.dtype != float32 there);
- the gated ops (`chunk_simple_gla`, `chunk_gated_delta_rule`) on Hopper with Triton in
  [3.4.0, 3.7.1) (fla #640): fla raises in their backward. The miscompile is pinned to a key tile
  BK = 64; the tile is min(next_pow2(K), 128) there, so ebb lifts fla's guard
  (`fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`), zero-pads smaller key dims to 128 for the
  call (exact: the padded key channels read and write nothing), and runs the op only once a
  forward and backward of it matched the PyTorch form on the device (`check_against_torch`, run
  by `plan_model`); an unchecked or failed combination runs torch.

`models.ops` asks `decision` (cached per op, device, dtype, key dim) at every call, so an input
the build did not foresee still gets a decision that cannot crash; `plan_model` makes the decisions
for a built model up front (on CUDA after applying the tuned kernel configs of `fla_configs`), runs
the checks, and returns the header's lines.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.imports import optional_attribute
from models.ops import fla_configs

BACKENDS = ("auto", "torch", "fla")
GATED = frozenset({"chunk_simple_gla", "chunk_gated_delta_rule"})  # their backward calls fla's gated chunk_bwd_dqkwg
FLA_640_TRITON = ((3, 4, 0), (3, 7, 1))  # [low, high): Hopper miscompiles gated chunk_bwd_dqkwg at BK = 64
FLA_640_SAFE_KEY_DIM = 128  # key dims below run padded to it there (tile 128)
CHECK_TOLERANCE = 0.05  # the start-up check's largest relative error (bf16 kernels against the PyTorch form)
FLA_MODULES = {
    "chunk_simple_gla": "fla.ops.simple_gla",
    "chunk_delta_rule": "fla.ops.delta_rule",
    "chunk_gated_delta_rule": "fla.ops.gated_delta_rule",
    "chunk_rwkv7": "fla.ops.rwkv7",
}


@dataclass(frozen=True)
class Platform:
    cuda: bool
    capability: tuple[int, int] | None = None
    triton: str | None = None  # version, None when not importable
    fla: bool = False  # fla's ops import


@dataclass(frozen=True)
class Decision:
    backend: str  # "fla" | "torch"
    reason: str
    lift_640: bool = False  # fla's #640 guard must be lifted (and the op checked) for this to run
    pad_key_to: int | None = None  # q, k and the state's key dim zero-padded to this for fla's call


def version(text: str | None) -> tuple[int, ...]:
    """(major, minor, patch) of a version string ('3.7.1rc1' -> (3, 7, 1))."""
    import re

    parts = [int(n) for n in re.findall(r"\d+", re.match(r"[\d.]*", text or "0").group())]
    return tuple((parts + [0, 0, 0])[:3])


def key_tile(key_dim: int, capability: tuple[int, int] | None) -> int:
    """fla's BK in chunk_bwd_dqkwg: min(max(next_pow2(K), 16), 128) on Hopper."""
    return min(max(1 << max(key_dim - 1, 0).bit_length(), 16), 128 if capability and capability[0] >= 9 else 64)


def backend_override() -> str:
    backend = os.environ.get("EBB_OPS_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"EBB_OPS_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def decide(op: str, platform: Platform, dtype: torch.dtype, key_dim: int, backend: str = "auto") -> Decision:
    """fla or torch for one op on one platform, with the reason in a few words."""
    if backend == "torch":
        return Decision("torch", "EBB_OPS_BACKEND=torch")
    if not platform.cuda:
        return Decision("torch", "not on CUDA")
    if not platform.fla:
        return Decision("torch", "fla not installed")
    forced = backend == "fla"
    if dtype == torch.float64 and not forced:
        return Decision("torch", "float64 inputs (fla has no float64 kernels)")
    if dtype == torch.float32 and op == "chunk_delta_rule" and not forced:
        return Decision("torch", "float32 inputs (fla's chunk_delta_rule takes bf16/fp16)")
    chosen = "EBB_OPS_BACKEND=fla" if forced else "fla kernel"
    hopper = platform.capability is not None and platform.capability[0] == 9
    low, high = FLA_640_TRITON
    if op in GATED and hopper and low <= version(platform.triton) < high:
        if key_tile(key_dim, platform.capability) == FLA_640_SAFE_KEY_DIM:
            return Decision("fla", f"{chosen}, fla #640 guard lifted (key dim {key_dim}, tile 128)", lift_640=True)
        return Decision(
            "fla", f"{chosen}, fla #640 guard lifted (key dim {key_dim} padded to tile 128)",
            lift_640=True, pad_key_to=FLA_640_SAFE_KEY_DIM,
        )
    return Decision("fla", chosen)


@functools.cache
def fla_kernel(op: str) -> Callable | None:
    """fla's `op` taking and returning states in ebb's layout, or None where fla does not import."""
    kernel = optional_attribute(FLA_MODULES[op], op)
    if kernel is not None and "state_v_first" in inspect.signature(kernel).parameters:
        kernel = with_state_v_first(kernel)
    return kernel


def with_state_v_first(kernel: Callable) -> Callable:
    """`kernel` run with its recurrent state laid out [V, K], as fla's own layers run it: Triton
    autotunes each layout apart, so ebb's calls reuse the configurations tuned for fla's models
    (and their cache). ebb's states stay [K, V] outside."""

    @functools.wraps(kernel)
    def call(*args, initial_state: Tensor | None = None, **kwargs):
        if initial_state is not None:
            initial_state = initial_state.transpose(-1, -2).contiguous()
        out, final_state = kernel(*args, initial_state=initial_state, state_v_first=True, **kwargs)
        return out, None if final_state is None else final_state.transpose(-1, -2)

    return call


@functools.cache
def platform_of(device: torch.device) -> Platform:
    if device.type != "cuda" or not torch.cuda.is_available():
        return Platform(cuda=False)
    fla = any(fla_kernel(op) is not None for op in FLA_MODULES)
    return Platform(True, torch.cuda.get_device_capability(device), optional_attribute("triton", "__version__"), fla)


_check_errors: dict[tuple, float] = {}  # the start-up checks' largest relative errors, per `decision` key


def _key(op: str, device: torch.device, dtype: torch.dtype, key_dim: int) -> tuple:
    """`decision`'s cache key: 'cuda' and 'cuda:0' are one device."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return op, device, dtype, key_dim, backend_override()


@functools.cache
def _decision(op: str, device: torch.device, dtype: torch.dtype, key_dim: int, backend: str) -> Decision:
    d = decide(op, platform_of(device), dtype, key_dim, backend)
    if d.backend == "fla" and fla_kernel(op) is None:
        return Decision("torch", f"fla has no {op}")
    return d


def decision(op: str, device: torch.device, dtype: torch.dtype, key_dim: int) -> Decision:
    """What runs `op` on inputs of this device, dtype and key dim. A decision that needs fla's #640
    guard lifted stands only once `plan_model`'s check of it passed; until then, or if it failed, torch."""
    key = _key(op, device, dtype, key_dim)
    d = _decision(*key)
    if not d.lift_640:
        return d
    err = _check_errors.get(key)
    if err is None:
        return Decision("torch", f"fla #640: key dim {key_dim} was not checked at start-up")
    if not err <= CHECK_TOLERANCE:
        return Decision("torch", f"fla #640 workaround failed its check (rel err {err:.1e})")
    return dataclasses.replace(d, reason=f"{d.reason}; checked against torch, rel err {err:.1e}")


@torch.compiler.assume_constant_result
def _fla_padding(op: str, device: torch.device, dtype: torch.dtype, key_dim: int) -> tuple[bool, int | None]:
    d = decision(op, device, dtype, key_dim)
    return d.backend == "fla", d.pad_key_to


def fla_padding(op: str, x: Tensor) -> tuple[bool, int | None]:
    """(whether `op` runs fla's kernel on inputs like `x`, its first input q or r; the key dim its
    call pads to, if any). Decided before tracing: under torch.compile this is a constant of the graph."""
    if not x.is_cuda:
        return False, None
    return _fla_padding(op, x.device, x.dtype, x.shape[-1])


@torch.compiler.disable
def run_fla(op: str, arguments: dict, pad_key_to: int | None = None) -> tuple[Tensor, Tensor | None]:
    """fla's `op` on ebb's arguments (chunk_size is fla's own choice), eagerly under torch.compile
    (Dynamo does not trace fla's autotuned Triton launches and host-side index building). With
    `pad_key_to`, q, k and the states' key dim are zero-padded to it for the call: the padded
    channels add nothing to q k^T and the state's padded rows stay zero, so the result is exact."""
    arguments = {n: t for n, t in arguments.items() if n != "chunk_size"}
    if pad_key_to is None:
        return fla_kernel(op)(**arguments)
    key_dim = arguments["q"].shape[-1]
    pad = pad_key_to - key_dim
    arguments.update(q=F.pad(arguments["q"], (0, pad)), k=F.pad(arguments["k"], (0, pad)))
    if arguments.get("scale") is None:
        arguments["scale"] = key_dim**-0.5
    if arguments.get("initial_state") is not None:
        arguments["initial_state"] = F.pad(arguments["initial_state"], (0, 0, 0, pad))
    out, final_state = fla_kernel(op)(**arguments)
    return out, None if final_state is None else final_state[..., :key_dim, :]


def fla_640_guard_lifted(lifted: bool) -> bool:
    """Set whether fla's #640 guard is lifted; returns what it was. `decide` only lets through
    key tiles other than the miscompiled 64."""
    chunk_o = importlib.import_module("fla.ops.common.chunk_o")
    if not hasattr(chunk_o, "TRITON_ABOVE_3_7_1"):
        raise RuntimeError("fla.ops.common.chunk_o has no TRITON_ABOVE_3_7_1: this fla's #640 guard is not the one ebb knows")
    was, chunk_o.TRITON_ABOVE_3_7_1 = chunk_o.TRITON_ABOVE_3_7_1, lifted
    return was


# --- recording which ops a model calls, with which shapes ---------------------------------------

@dataclass(frozen=True)
class OpCall:
    """One op call of `plan_model`'s probe forward: the block's pattern character, the op, each
    floating input's dtype as the op received it (autocast applied), q's [H, K] and v's [HV, V]."""

    kind: str
    op: str
    dtypes: tuple[tuple[str, torch.dtype], ...]
    q_shape: tuple[int, ...]
    v_shape: tuple[int, ...]

    @classmethod
    def of(cls, kind: str, op: str, arguments: dict) -> OpCall:
        """The call of `op` on these arguments (by name, q or r first, as the op takes them)."""
        q, v = next(iter(arguments.values())), arguments["v"]
        dtypes = tuple((n, t.dtype) for n, t in arguments.items() if isinstance(t, Tensor) and t.is_floating_point())
        return cls(kind, op, dtypes, tuple(q.shape[2:]), tuple(v.shape[2:]))

    @property
    def dtype(self) -> torch.dtype:
        """The first input's (q's, or r's) dtype, which decides the backend."""
        return self.dtypes[0][1]


_calls: list[OpCall] | None = None  # the calls seen while `recording`
_block = "?"  # the pattern character of the block running, while recording


def is_recording() -> bool:
    """Whether `plan_model`'s probe forward is running (everything runs PyTorch then: no kernel is
    autotuned at the probe's toy shapes)."""
    return _calls is not None


def record(op: str, arguments: dict) -> bool:
    """Called by the op wrappers: note the call when recording; True when recording (run torch)."""
    if _calls is None:
        return False
    _calls.append(OpCall.of(_block, op, arguments))
    return True


def _enter_block(kind: str) -> None:
    global _block
    _block = kind


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[OpCall]]:
    global _calls
    _calls, calls = [], []
    _calls = calls
    handles = [
        block.register_forward_pre_hook(lambda m, a, kind=getattr(block, "kind", "?"): _enter_block(kind))
        for block in getattr(model, "blocks", [])
    ]
    try:
        yield calls
    finally:
        _calls = None
        for h in handles:
            h.remove()


CHECK_TOKENS = 4096  # enough chunks to fill the GPU, so the configurations Triton autotunes in the check suit training


def _inputs(call: OpCall, device: torch.device, T: int = CHECK_TOKENS) -> dict[str, Tensor]:
    """Random inputs for a recorded call of a delta-rule or gated op (q, k, v and its g and/or
    beta), with its per-head shapes and each input's dtype, laid out as a training step's: T
    tokens packed as two documents (int32 cu_seqlens, a boundary inside a chunk). fla's
    autotuning is keyed by head shapes, dtypes and whether documents are packed, not by length,
    so the check autotunes the very kernels the first training step runs."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    (H, K), (HV, V) = call.q_shape, call.v_shape
    args = {
        "q": torch.nn.functional.normalize(rand(1, T, H, K), dim=-1),
        "k": torch.nn.functional.normalize(rand(1, T, H, K), dim=-1),
        "v": rand(1, T, HV, V),
        "g": -torch.nn.functional.softplus(rand(1, T, HV)),
        "beta": torch.sigmoid(rand(1, T, HV)),
    }
    args = {n: args[n].to(dtype) for n, dtype in call.dtypes}
    args["cu_seqlens"] = torch.tensor([0, T // 3 + 1, T], dtype=torch.int32, device=device)
    return args


def check_against_torch(fla_op: Callable, torch_op: Callable, args: dict[str, Tensor], tolerance: float = CHECK_TOLERANCE) -> tuple[bool, float]:
    """Forward and backward of `fla_op` against `torch_op` on the same inputs: (passed, the
    largest relative error over the output and every input's gradient)."""
    worst = 0.0
    results = []
    differentiable = [n for n, t in args.items() if t.is_floating_point()]
    for fn in (fla_op, torch_op):
        leaves = {n: t.detach().clone().requires_grad_(n in differentiable) for n, t in args.items()}
        out = fn(**leaves)[0]
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        out.backward(grad_out)
        results.append([out.detach().float()] + [leaves[n].grad.float() for n in differentiable])
    for got, want in zip(*results):
        err = ((got - want).norm() / want.norm().clamp(min=1e-12)).item()
        worst = max(worst, err if err == err else float("inf"))
    return worst <= tolerance, worst


def checked_decision(call: OpCall, device: torch.device, torch_op: Callable) -> Decision:
    """`decision` for a recorded call, after its #640 start-up check where it needs one."""
    key = _key(call.op, device, call.dtype, call.q_shape[-1])
    pending = _decision(*key)
    if pending.lift_640 and key not in _check_errors:
        _check_errors[key] = _check_lifted_guard(call, device, torch_op, pending.pad_key_to)
    return decision(call.op, device, call.dtype, call.q_shape[-1])


def _check_lifted_guard(call: OpCall, device: torch.device, torch_op: Callable, pad_key_to: int | None) -> float:
    """The start-up check of one op under fla's lifted #640 guard: its relative error. The guard
    stays lifted only if the check passed."""
    was = fla_640_guard_lifted(True)
    passed, err = check_against_torch(lambda **arguments: run_fla(call.op, arguments, pad_key_to), torch_op, _inputs(call, device))
    fla_640_guard_lifted(was or passed)
    return err


def planned_calls(module: nn.Module, probe: Callable[[], object], device: torch.device, torch_ops: dict[str, Callable]) -> list[tuple[OpCall, Decision]]:
    """Run `probe` (a forward of `module`) recording the ops it calls, then decide each, after its
    #640 start-up check where it needs one."""
    with recording(module) as calls, torch.no_grad():
        probe()
    return [(call, checked_decision(call, device, torch_ops[call.op])) for call in calls]


def plan_model(model: nn.Module, device: torch.device, dtype: torch.dtype, torch_ops: dict[str, Callable], seq_len: int = 64) -> str:
    """Decide each op the model calls once, check the #640 workaround where it applies, and say
    what runs per mixer in one line (the run's header). On CPU nothing is probed. On CUDA the
    tuned configs of fla's kernels for this GPU apply first (`fla_configs`: the check's and the
    first step's launches take them), and the header gains a line about them."""
    backend = backend_override()
    if device.type != "cuda":
        why = "EBB_OPS_BACKEND=torch" if backend == "torch" else f"device {device.type}"
        return f"ebb: ops: PyTorch for every mixer ({why})"
    configs_line = fla_configs.apply_for(device)

    def probe() -> None:
        with torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext():
            model(torch.zeros(1, seq_len, dtype=torch.long, device=device))

    per_mixer: dict[str, dict[str, str]] = {}
    for call, d in planned_calls(model, probe, device, torch_ops):
        per_mixer.setdefault(call.kind, {})[call.op] = f"{d.backend} {call.op} ({d.reason})"
    kinds = [getattr(b, "kind", "?") for b in getattr(model, "blocks", [])]
    parts = [f"{k}: " + (", ".join(per_mixer[k].values()) if k in per_mixer else "no recurrent op") for k in dict.fromkeys(kinds)]
    return "\n".join(["ebb: ops: " + "; ".join(parts), *([configs_line] if configs_line else [])])
