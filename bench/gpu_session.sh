#!/usr/bin/env bash
# The GPU measurements, in one call on one GPU machine without internet:
#   bash ../shared/tools/device_wheels.sh            # once, here: the wheels that machine lacks, into .whl/
#   bash bench/gpu_session.sh [SECONDS] [PARTS]       # there, from the repo root (carry .whl, and .tc if kept)
# PARTS, comma-separated, run in order within SECONDS (default 540):
#   throughput  bench/gpu_throughput.py (fla's GDN model vs ebb's stacks); gets what the other parts leave
#   norms       bench/norms.py            fused_loss  bench/fused_loss.py
#   offload     bench/offload.py (interleaved optimizer offload vs all-host and torchao's)
#   tests       the cuda-marked tests, in the time left
# Default: throughput,norms,fused_loss,tests. MODELS=fla_gdn,ebb_G (say) limits the throughput bench to those
# models, so that a long first autotuning can be split over two calls on the same warm machine. The log, the JSON results (results.tgz) and Triton's
# cache (.triton_cache/, as a tar in 15 MB parts, and its autotuning results alone in autotune.tgz,
# should the parts be too many to come back) go to $OUT (default /tmp/ebb_gpu_out); put them in .tc/
# here and carry .tc next time: the session unpacks them, and autotuning is skipped.
set -u
budget=${1:-540}
parts=",${2:-throughput,norms,fused_loss,tests},"
began=$(date +%s)
left() { echo $((budget - ($(date +%s) - began))); }
want() { [[ "$parts" == *",$1,"* ]]; }
within() {  # within SECONDS COMMAND...: run it under that limit, or say it is skipped when under 10 s remain
  if [ "$1" -lt 10 ]; then echo "skipped, ${1}s left: ${*:2}"; return 1; fi
  timeout "$@"
}
OUT=${OUT:-/tmp/ebb_gpu_out}
LOG="$OUT/session.log"
mkdir -p "$OUT" bench/results
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p "$TRITON_CACHE_DIR"
ls .tc/triton_cache.tgz* >/dev/null 2>&1 && cat .tc/triton_cache.tgz* | tar xzf -
[ -f .tc/autotune.tgz ] && tar xzf .tc/autotune.tgz
echo "Triton cache: $(du -sh .triton_cache | cut -f1), $(find .triton_cache -name '*.autotune.json' | wc -l) autotuning results"
python3 - <<'PY' 2>&1 | tee "$LOG"
import importlib, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "fla", "liger_kernel", "torchao", "pydantic"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "does not import:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
PY
reserve=30  # packing the results and the cache
for p in norms:60 fused_loss:60 offload:120 tests:120; do want "${p%:*}" && reserve=$((reserve + ${p#*:})); done
export TRITON_PRINT_AUTOTUNING=1  # where the warm-up goes: each autotuned kernel, its key and its seconds
want throughput && within $(( $(left) - reserve )) python3 bench/gpu_throughput.py --triton-cache "$TRITON_CACHE_DIR" ${MODELS:+--only "$MODELS"} 2>&1 \
  | grep --line-buffered -v "^Autotuning kernel .* with config" | tee -a "$LOG"
unset TRITON_PRINT_AUTOTUNING
want norms && within 60 python3 bench/norms.py 2>&1 | tee -a "$LOG"
want fused_loss && within 60 python3 bench/fused_loss.py 2>&1 | tee -a "$LOG"
want offload && within $(( $(left) - 60 )) python3 bench/offload.py 2>&1 | tee -a "$LOG"
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 300")  # where pytest-timeout is installed
want tests && within $(( $(left) - 25 )) python3 -m pytest -q -rs $per_test -p no:cacheprovider --continue-on-collection-errors -m cuda \
  tests/models/test_cuda_fast_path.py tests/optim/test_offload.py tests/models/test_rwkv7.py tests/pretrain/test_linear_ce.py \
  tests/optim/test_optim_codecs.py tests/optim/test_optim_grouped.py tests/checkpoint/test_lazy_checkpoint.py tests/data/test_data_pipeline.py 2>&1 | tee -a "$LOG"
tar czf "$OUT/results.tgz" bench/results/*.json 2>/dev/null
find .triton_cache -name '*.autotune.json' | tar czf "$OUT/autotune.tgz" -T -  # small: the autotuning results alone
tar czf "$OUT/triton_cache.tgz" .triton_cache
[ "$(stat -c %s "$OUT/triton_cache.tgz")" -gt 15000000 ] && split -b 15000000 -d -a 1 "$OUT/triton_cache.tgz" "$OUT/triton_cache.tgz." && rm "$OUT/triton_cache.tgz"
du -sh "$TRITON_CACHE_DIR" "$OUT"/*
grep -E "^(model |fla_gdn |ebb_|ebb G|  (fla_gdn|ebb_[a-zA-Z0-9_]+): skipped)" "$LOG" | tail -12
