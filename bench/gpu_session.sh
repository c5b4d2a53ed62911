#!/usr/bin/env bash
# Everything the GPU fast path measures, in one call on one GPU machine without internet:
#   bash ../shared/tools/device_wheels.sh      # once, here: the wheels that machine lacks, into .whl/
#   bash bench/gpu_session.sh [SECONDS]         # there, from the repo root (carry .whl and .triton_cache)
# Order: the throughput bench (the goal), the norm and fused-loss benches, then the CUDA tests in what time is left
# of SECONDS (default 540). The log, the JSON results (results.tgz) and Triton's cache (.triton_cache/, as a tar in
# 15 MB parts) go to $OUT (default /tmp/ebb_gpu_out); unpack it here and carry it next time to
# skip autotuning: cat triton_cache.tgz* | tar xzf -
set -u
budget=${1:-540}
began=$(date +%s)
left() { echo $((budget - ($(date +%s) - began))); }
OUT=${OUT:-/tmp/ebb_gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p "$TRITON_CACHE_DIR"
python3 - <<'PY' 2>&1 | tee "$OUT/session.log"
import importlib, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "fla", "liger_kernel", "torchao", "pydantic"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "does not import:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
PY
timeout $(( $(left) - 200 )) python3 bench/gpu_throughput.py --triton-cache "$TRITON_CACHE_DIR" 2>&1 | tee -a "$OUT/session.log"
timeout 60 python3 bench/norms.py 2>&1 | tee -a "$OUT/session.log"
timeout 60 python3 bench/fused_loss.py 2>&1 | tee -a "$OUT/session.log"
t=$(( $(left) - 25 ))
[ "$t" -gt 30 ] && timeout "$t" python3 -m pytest -q -rs --timeout 300 -p no:cacheprovider --continue-on-collection-errors -m cuda \
  tests/models/test_cuda_fast_path.py tests/models/test_rwkv7.py tests/pretrain/test_linear_ce.py tests/optim/test_optim_codecs.py \
  tests/optim/test_optim_grouped.py tests/checkpoint/test_lazy_checkpoint.py tests/data/test_data_pipeline.py 2>&1 | tee -a "$OUT/session.log"
tar czf "$OUT/results.tgz" bench/results/*.json
tar czf "$OUT/triton_cache.tgz" .triton_cache
[ "$(stat -c %s "$OUT/triton_cache.tgz")" -gt 15000000 ] && split -b 15000000 -d -a 1 "$OUT/triton_cache.tgz" "$OUT/triton_cache.tgz." && rm "$OUT/triton_cache.tgz"
du -sh "$TRITON_CACHE_DIR" "$OUT"/*
