#!/usr/bin/env bash
# The GPU measurements, in one call on one GPU machine without internet:
#   WITH_BNB=1 bash ../shared/tools/device_wheels.sh # once, here: the wheels that machine lacks, into .whl/ (~52 MB;
#                                                    # bitsandbytes is for the optim part)
#   bash bench/gpu_session.sh [SECONDS] [PARTS]       # there, from the repo root (carry .whl, and .tc if kept)
# PARTS, comma-separated, run in the order given (the default is by value) within SECONDS (default 540);
# each part may take what is left (the packing's 30 s aside), up to its cap:
#   startup_without  bench/gpu_startup.py --variants without: process start to the end of the first step of
#                    ebb's 1.3B G stack, empty Triton cache, no tuned kernel configs: it autotunes (minutes) and
#                    captures the set (.tc/fla_configs); its Triton cache becomes the session's when that was empty
#   startup_with     the same from an empty Triton cache with that set (or the shipped one): the <= 60 s goal
#   throughput       bench/gpu_throughput.py (fla's GDN model vs ebb's stacks), with the set, adding to it
#   optim            bench/optim_states.py --device cuda --size 350m (low-bit AdamW vs torch fused, torchao, bitsandbytes)
#   offload          bench/offload.py (interleaved optimizer offload vs none, all-host and torchao's)
#   tests            the cuda-marked tests, in the time left
#   norms, fused_loss  bench/norms.py, bench/fused_loss.py (measured already: not in the default)
# Default: startup_without,startup_with,throughput,optim,offload,tests. MODELS=fla_gdn,ebb_G (say) limits the
# throughput bench to those models. What one call does not reach, a second call on the warm machine does (it
# keeps .tc/ and .triton_cache/): e.g. `bash bench/gpu_session.sh 240 optim,offload,tests`.
# Back in $OUT (default /tmp/ebb_gpu_out): session.log, results.tgz (bench/results/*.json), fla_configs.tgz (the
# captured set: `tar xzf fla_configs.tgz -C models/ops/kernel_configs` ships it; put it in .tc/ and carry .tc
# next time and the session uses it), and Triton's cache as triton_cache.tgz[.N] parts of 15 MB where they fit
# (.tc/ too: the session unpacks them, which saves compiling).
set -u
budget=${1:-540}
parts=",${2:-startup_without,startup_with,throughput,optim,offload,tests},"
began=$(date +%s)
pack=30  # packing the results and the cache
left() { echo $((budget - ($(date +%s) - began) - pack)); }
want() { [[ "$parts" == *",$1,"* ]]; }
cap() { local limit; limit=$(left); [ "$1" -gt 0 ] && [ "$1" -lt "$limit" ] && limit=$1; echo "$limit"; }  # what is left, at most $1 (0: no cap)
within() {  # within CAP COMMAND...: run it for `cap CAP` seconds, or say it is skipped under 10 s
  local limit; limit=$(cap "$1")
  if [ "$limit" -lt 10 ]; then echo "skipped, ${limit}s left: ${*:2}"; return 1; fi
  timeout "$limit" "${@:2}"
}
OUT=${OUT:-/tmp/ebb_gpu_out}
LOG="$OUT/session.log"
SETS=$PWD/.tc/fla_configs  # the captured kernel-config sets, <GPU>/<kernel>.json
mkdir -p "$OUT" bench/results "$SETS"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p "$TRITON_CACHE_DIR"
ls .tc/triton_cache.tgz* >/dev/null 2>&1 && cat .tc/triton_cache.tgz* | tar xzf -
[ -f .tc/fla_configs.tgz ] && tar xzf .tc/fla_configs.tgz -C "$SETS"
sets() { [ -n "$(ls -A "$SETS")" ] && echo "$SETS" || echo auto; }  # EBB_FLA_CONFIGS: the captured set, else the shipped ones
python3 - <<'PY' 2>&1 | tee "$LOG"
import importlib, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "fla", "liger_kernel", "torchao", "bitsandbytes", "pydantic"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "does not import:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
PY
echo "Triton cache: $(du -sh .triton_cache | cut -f1); kernel-config sets: $(sets)" | tee -a "$LOG"
if want startup_without; then
  cold=()  # the session's Triton cache, when empty, is a fresh machine's: measure in it, and keep what it tuned
  [ -z "$(ls -A .triton_cache)" ] && cold=(--cold-cache .triton_cache)
  EBB_FLA_CONFIGS_CAPTURE=$SETS within 420 python3 bench/gpu_startup.py --variants without "${cold[@]}" --timeout $(($(cap 420) - 15)) \
    --out bench/results/gpu_startup_without.json 2>&1 | tee -a "$LOG"
fi
want startup_with && within 150 python3 bench/gpu_startup.py --variants with --fla-configs "$(sets)" --timeout $(($(cap 150) - 15)) \
  --out bench/results/gpu_startup_with.json 2>&1 | tee -a "$LOG"
if want throughput; then
  export TRITON_PRINT_AUTOTUNING=1  # where the warm-up goes: each kernel autotuned all the same, its key and its seconds
  EBB_FLA_CONFIGS=$(sets) EBB_FLA_CONFIGS_CAPTURE=$SETS within 0 python3 bench/gpu_throughput.py --triton-cache "$TRITON_CACHE_DIR" ${MODELS:+--only "$MODELS"} 2>&1 \
    | grep --line-buffered -v "^Autotuning kernel .* with config" | tee -a "$LOG"
  unset TRITON_PRINT_AUTOTUNING
fi
export EBB_FLA_CONFIGS=$(sets)
want optim && within 150 python3 bench/optim_states.py --device cuda --size 350m 2>&1 | tee -a "$LOG"
want offload && within 180 python3 bench/offload.py 2>&1 | tee -a "$LOG"
want norms && within 60 python3 bench/norms.py 2>&1 | tee -a "$LOG"
want fused_loss && within 60 python3 bench/fused_loss.py 2>&1 | tee -a "$LOG"
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 300")  # where pytest-timeout is installed
want tests && within 0 python3 -m pytest -q -rs $per_test -p no:cacheprovider --continue-on-collection-errors -m cuda \
  tests/models/test_cuda_fast_path.py tests/models/test_fla_configs.py tests/optim/test_offload.py tests/models/test_rwkv7.py tests/pretrain/test_linear_ce.py \
  tests/optim/test_optim_codecs.py tests/optim/test_optim_grouped.py tests/checkpoint/test_lazy_checkpoint.py tests/data/test_data_pipeline.py 2>&1 | tee -a "$LOG"
python3 -m launch.fla_configs "$SETS" 2>&1 | tee -a "$LOG"
tar czf "$OUT/results.tgz" bench/results/*.json 2>/dev/null
[ -n "$(ls -A "$SETS")" ] && tar czf "$OUT/fla_configs.tgz" -C "$SETS" .
tar czf /tmp/triton_cache.tgz .triton_cache
if [ "$(stat -c %s /tmp/triton_cache.tgz)" -le 45000000 ]; then  # at most 8 files and 64 MB come back
  split -b 15000000 -d -a 1 /tmp/triton_cache.tgz "$OUT/triton_cache.tgz."
else
  echo "Triton cache: $(du -sh /tmp/triton_cache.tgz | cut -f1) packed, too large to come back; the kernel-config set spares its autotuning" | tee -a "$LOG"
fi
du -sh "$TRITON_CACHE_DIR" "$OUT"/*
grep -E "^(model |fla_gdn |ebb_|ebb G|without |with |  (fla_gdn|ebb_[a-zA-Z0-9_]+): skipped|skipped, )" "$LOG" | tail -16
