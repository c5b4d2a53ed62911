#!/usr/bin/env bash
# Pretrain the quickstart hybrid (configs/quickstart.yaml) on the embedded corpus, then sample from it.
# Each invocation writes a new run directory runs/quickstart-<time> (nothing earlier is overwritten).
# Extra arguments are config overrides, e.g. `bash launch/quickstart.sh train.steps=50`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
run_dir=runs/quickstart-$(date +%Y%m%d-%H%M%S)
python -m pretrain.train --config configs/quickstart.yaml train.run_dir="$run_dir" "$@"
echo
python -m pretrain.generate --checkpoint "$run_dir" --prompt "def main(" --max-new-tokens 200 --temperature 0.8
echo
echo "run dir: $run_dir"
echo "  resume (after an interruption): python -m pretrain.train --config configs/quickstart.yaml --resume train.run_dir=$run_dir"
echo "  plot:     python -m pretrain.plot $run_dir --output $run_dir/curves.png"
