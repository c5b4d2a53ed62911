#!/usr/bin/env bash
# Train with torchrun on this node: every argument after the config goes to pretrain.train
# (config overrides, --resume).
#
#   bash launch/torchrun.sh configs/quickstart.yaml parallel.tp=2 train.run_dir=runs/tp2
#
# The console shows the ranks' output as one process would print it (the prefix torchrun puts on
# each relayed line is dropped when one rank is shown), and a run that fails ends with its one
# `error:` line and pretrain.train's exit status (2; 128 + N after signal N), not torchrun's own
# report, which goes to LOG_DIR/torchrun.log with every rank's full output.
#
# Signals: Ctrl-C and a scheduler's SIGTERM reach torchrun with this script (they signal the
# process group), and torchrun passes them to the ranks, which save a checkpoint and exit; this
# script waits for that. To stop a run from elsewhere, signal the process group (kill -- -PGID).
# SIGKILL never reaches the ranks (torchrun starts each in a session of its own), but they notice
# that torchrun is gone, stop after the step, let the checkpoint being written commit and exit.
# A rank killed alone: torchrun stops the others, and the console shows one line.
#
# Environment (all optional):
#   NPROC          processes on this node (default: the GPUs here, else 2)
#   NNODES         nodes; above 1, RDZV_ENDPOINT (host:port of a node in the job) and RDZV_ID
#                  (the same on every node) give torchrun's c10d rendezvous (launch/slurm.sbatch sets them)
#   LOG_RANKS      local ranks whose output reaches the console (default 0; "" = all); every
#                  rank's full output is in LOG_DIR either way
#   LOG_DIR        per-rank logs (default runs/logs/torchrun-<time>)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives the ranks to save after a signal (default 300)
#   OMP_NUM_THREADS  CPU threads per process (default: this node's cores / NPROC)
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "error: usage: bash launch/torchrun.sh CONFIG [section.key=value ...] [--resume]" >&2
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
mkdir -p "$log_dir"
torchrun_log=$log_dir/torchrun.log
shown_errors=$log_dir/.errors-shown
: > "$shown_errors"

if [ "$nnodes" -gt 1 ]; then
  rendezvous=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port for $nnodes nodes}" --rdzv-id "${RDZV_ID:-ebb}")
else
  rendezvous=(--standalone --nnodes 1)
fi
filter=()
log_ranks=${LOG_RANKS-0}
if [ -n "$log_ranks" ]; then
  filter=(--local-ranks-filter "$log_ranks")
fi
# one rank on the console: its lines need no "[defaultN]:" prefix
single=$([[ "$log_ranks" =~ ^[0-9]+$ ]] && echo 1 || echo 0)

# relay STREAM: the ranks' lines torchrun relays go to the console (each error line once, bare);
# torchrun's own lines (its log, the report of a failed rank) go to torchrun.log. Relays ignore
# INT and TERM, so that they outlive torchrun's shutdown after a signal.
relay() {
  trap '' INT TERM
  exec awk -v single="$single" -v log_file="$torchrun_log" -v shown="$shown_errors" '
    match($0, /^\[default[0-9]+\]:/) {
      line = substr($0, RLENGTH + 1)
      if (line ~ /^error: /) {
        if (!(line in seen)) { seen[line] = 1; print line; print line >> shown; fflush(shown) }
      } else {
        print (single ? line : $0)
      }
      fflush(); next
    }
    { print >> log_file; fflush(log_file) }'
}

# the signal this script received (torchrun got it too: see the header), to exit with it
received=0
trap 'received=130' INT
trap 'received=143' TERM

status=0
torchrun "${rendezvous[@]}" --nproc-per-node "$nproc_per_node" \
  --log-dir "$log_dir" --tee 3 "${filter[@]}" --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" \
  -m pretrain.train --config "$config" "$@" \
  > >(relay) 2> >(relay >&2) || status=$?
wait  # for the relays to drain

if [ "$status" -eq 0 ]; then
  exit 0
fi
# torchrun exits 1 for any failed rank; the first failure it observed carries the rank's status
first=$(grep -m1 -oE 'failed \(exitcode: -?[0-9]+\) local_rank: [0-9]+' "$torchrun_log" || true)
code=$(sed -E 's/.*exitcode: (-?[0-9]+).*/\1/' <<< "$first")
rank=$(sed -E 's/.*local_rank: ([0-9]+).*/\1/' <<< "$first")
if [ -z "$code" ]; then
  if [ "$received" -ne 0 ]; then
    exit "$received"
  fi
  echo "error: torchrun failed with exit code $status; its messages are in $torchrun_log" >&2
  exit "$status"
fi
if [ "$code" -lt 0 ]; then
  code=$(( 128 - code ))  # killed by signal -code
fi
if [ -s "$shown_errors" ] || [ "$code" -eq 130 ] || [ "$code" -eq 143 ]; then
  :  # the console has its line already (a rank's error; a signal's own line)
elif [ "$code" -eq 2 ]; then
  # the failed rank's error line, when the console did not show that rank
  line=$(grep -h '^error: ' "$log_dir"/*/attempt_*/"$rank"/stderr.log 2>/dev/null | tail -n 1 || true)
  echo "${line:-error: local rank $rank failed with exit code 2; its output is in $log_dir}" >&2
elif [ "$code" -gt 128 ]; then
  echo "error: local rank $rank was killed by SIG$(kill -l $(( code - 128 ))) (exit code $code); every rank's output is in $log_dir" >&2
else
  echo "error: local rank $rank exited with code $code; its output is in $log_dir" >&2
fi
exit "$code"
