#!/usr/bin/env bash
# Train with torchrun on this node: every argument after the config goes to pretrain.train
# (config overrides, --resume).
#
#   bash launch/torchrun.sh configs/quickstart.yaml parallel.tp=2 train.run_dir=runs/tp2
#
# Environment (all optional):
#   NPROC          processes on this node (default: the GPUs here, else 2)
#   NNODES         nodes; above 1, RDZV_ENDPOINT (host:port of a node in the job) and RDZV_ID
#                  (the same on every node) give torchrun's c10d rendezvous (launch/slurm.sbatch sets them)
#   LOG_RANKS      local ranks whose output reaches the console (default 0; "" = all); every
#                  rank's full output is in LOG_DIR either way
#   LOG_DIR        per-rank logs (default runs/logs/torchrun-<time>)
#   OMP_NUM_THREADS  CPU threads per process (default: this node's cores / NPROC)
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash launch/torchrun.sh CONFIG [section.key=value ...] [--resume]" >&2
  exit 2
fi
. "$(dirname "$0")/env.sh"
config=$1
shift

gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
nproc_per_node=${NPROC:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)}
nnodes=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc_per_node > 0 ? $(nproc) / nproc_per_node : 1 ))}
log_dir=${LOG_DIR:-runs/logs/torchrun-$(date +%Y%m%d-%H%M%S)}

if [ "$nnodes" -gt 1 ]; then
  rendezvous=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port for $nnodes nodes}" --rdzv-id "${RDZV_ID:-ebb}")
else
  rendezvous=(--standalone --nnodes 1)
fi
filter=()
if [ -n "${LOG_RANKS-0}" ]; then
  filter=(--local-ranks-filter "${LOG_RANKS-0}")
fi

exec torchrun "${rendezvous[@]}" --nproc-per-node "$nproc_per_node" \
  --log-dir "$log_dir" --tee 3 "${filter[@]}" \
  -m pretrain.train --config "$config" "$@"
