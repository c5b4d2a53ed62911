#!/usr/bin/env bash
# Sourced by the other launch scripts: create .venv and install ebb into it when missing or stale.
# torch is installed first and pinned only here, so that the package's torch range never pulls
# another build (on a CPU machine `torch==2.13.0` resolves to the CPU wheel).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EBB_VENV:-$root/.venv}
python=${PYTHON:-python3}
torch_spec=${EBB_TORCH:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
  echo "[ebb] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

stamp="$venv/.ebb-installed"
want=$(sha1sum < "$root/pyproject.toml" | cut -d" " -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! python -c "import torch" 2>/dev/null; then
    echo "[ebb] installing $torch_spec"
    pip install --quiet --disable-pip-version-check "$torch_spec"
  fi
  echo "[ebb] installing ebb and its dependencies"
  pip install --quiet --disable-pip-version-check -e "$root[dev]"
  echo "$want" > "$stamp"
fi
cd "$root"
