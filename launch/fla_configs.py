"""The sets of tuned kernel configs in a directory (default: those ebb ships), one line each: the
GPU, fla's and Triton's versions, kernels and keys, and whether it would apply here.

    python -m launch.fla_configs [DIR]

Sets are captured with EBB_FLA_CONFIGS_CAPTURE=DIR (README: GPU fast path) and applied at start-up
(models/ops/fla_configs.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from models.ops import fla_configs


def describe(directory: Path, installed: dict[str, str | None], gpu: str | None) -> str:
    try:
        kernel_set = fla_configs.read_set(directory)
    except fla_configs.SetError as exc:
        return f"{directory.name}: unreadable ({exc})"
    wrong = {p: installed.get(p) for p, v in kernel_set.versions.items() if installed.get(p) != v}
    here = f"not with {fla_configs.versions_text(wrong)} as here" if wrong else "matches the versions here"
    if gpu is not None:
        here += ", this GPU" if fla_configs.gpu_dir(gpu) == directory.name else f", not this GPU ({gpu})"
    keys = sum(map(len, kernel_set.kernels.values()))
    return (f"{kernel_set.gpu}: {len(kernel_set.kernels)} kernels, {keys} keys, {fla_configs.versions_text(kernel_set.versions)} ({here})\n"
            f"  {', '.join(sorted(kernel_set.kernels))}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("-"):
        print(__doc__.strip())
        return 0 if argv[0] in ("-h", "--help") else 2
    root = Path(argv[0]) if argv else fla_configs.SHIPPED
    sets = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not sets:
        print(f"no kernel-config sets in {root}")
        return 0
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    installed = fla_configs.installed_versions()
    for directory in sets:
        print(describe(directory, installed, gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
