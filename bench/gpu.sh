#!/usr/bin/env bash
# GPU benchmark for rear_ds: reAR-S/B/L training step (bf16, full reAR loss, with and without activation
# checkpointing, per-block torch.compile for L, the eager reference for L), activation memory, KV-cache
# sampling, reader and tokenizer throughput, a CUDA profile. Fits in 8 minutes on one H200 (a 420 s budget
# inside; sections that would start later are recorded as skipped).
#
# On a lent GPU machine (see ../shared/docs/gpu.md): first, here, `bash ../shared/tools/device_wheels.sh`
# (fills .whl/ with deepspeed & co.); then run with carry [".whl"]:
#     bash bench/gpu.sh "$OUT"
# Results: $OUT/gpu_<date>.json and $OUT/BENCHMARKS_gpu.md (copy the block into BENCHMARKS.md's GPU section,
# or run `python -m bench.run --gpu` directly in a checkout to update BENCHMARKS.md in place).
# Dry run of the same code paths on a CPU: BENCH_QUICK=1 bash bench/gpu.sh /tmp/gpu_dry
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results}}"
mkdir -p "$OUT_DIR"
if ! python3 -c "import deepspeed" >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
QUICK=()
[ "${BENCH_QUICK:-0}" = "1" ] && QUICK=(--quick)
STAMP="$(date +%F)"
timeout 470 python3 -m bench.run --gpu "${QUICK[@]}" --budget-s 420 \
  --out "$OUT_DIR/gpu_${STAMP}.json" --md "$OUT_DIR/BENCHMARKS_gpu.md" 2>&1 | tail -n 120
rc=${PIPESTATUS[0]}
echo "bench/gpu.sh: exit $rc; results in $OUT_DIR/gpu_${STAMP}.json"
exit "$rc"
