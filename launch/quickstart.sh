#!/usr/bin/env bash
# Pretrain the quickstart hybrid (configs/quickstart.yaml) on the embedded corpus, then sample from it.
# Extra arguments are config overrides, e.g. `bash launch/quickstart.sh train.steps=50`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -m pretrain.train --config configs/quickstart.yaml "$@"
run_dir=$(python -c "import sys; from pretrain.config import load_config; print(load_config('configs/quickstart.yaml', sys.argv[1:]).train.run_dir)" "$@")
echo
python -m pretrain.generate --checkpoint "$run_dir" --prompt "def main(" --max-new-tokens 200 --temperature 0.8
