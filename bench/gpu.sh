#!/usr/bin/env bash
# GPU checks and benchmark for rear_ds. First a smoke of the trainer under the deepspeed launcher
# (bench/gpu_smoke.py: compile + resume, bf16_autocast, ZeRO-3; GPU_SMOKE=0 skips it), then the benchmark:
# reAR-S/B/L training step (bf16, full reAR loss, with and without activation checkpointing, per-block
# torch.compile for L, the eager reference for L), activation memory, KV-cache sampling, reader and
# tokenizer throughput, a CUDA profile, reAR-B-AliTok vs the official AliTok code (set ALITOK_REPO to a checkout
# of ali-vilab/alitok at 093e957, else those rows are skipped with the reason). Both fit in 8 minutes on one H200: the benchmark
# gets what the smoke left of 465 s (sections that would start later are recorded as skipped).
#
# On a lent GPU machine (see ../shared/docs/gpu.md): first, here, `bash ../shared/tools/device_wheels.sh`
# (fills .whl/ with deepspeed & co.); then run with carry [".whl"] (the copied tree has no .git, so pass the
# commit):
#     REAR_GIT_COMMIT=<sha> bash bench/gpu.sh "$OUT"
# Results: $OUT/gpu_<date>.json (rewritten after every section, so a timeout keeps what was measured),
# $OUT/BENCHMARKS_gpu.md (copy the block into BENCHMARKS.md's GPU section, or run `python -m bench.run --gpu`
# directly in a checkout to update BENCHMARKS.md in place) and the full log $OUT/bench_gpu.log.
# Dry run of the same code paths on a CPU: BENCH_QUICK=1 bash bench/gpu.sh /tmp/gpu_dry
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results}}"
mkdir -p "$OUT_DIR"
if ! python3 -c "import deepspeed" >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"  # bin/: the deepspeed launcher
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
# Three training runners (rear, rear checkpointed, eager) live together in the interleaved rounds: let the
# allocator grow segments instead of fragmenting.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
QUICK=()
[ "${BENCH_QUICK:-0}" = "1" ] && QUICK=(--quick)
# BENCH_ONLY=alitok,tokenize runs only those sections of the benchmark (a follow-up run in a short GPU lease).
[ -n "${BENCH_ONLY:-}" ] && QUICK+=(--only "$BENCH_ONLY")
STAMP="$(date +%F)"
# 1. The trainer itself on the GPU (deepspeed launcher, compile, resume, autocast, ZeRO-3): about 1-2 min.
smoke_rc=0
if [ "${GPU_SMOKE:-1}" = "1" ]; then
  # GPU_SMOKE_RUNS=a,b picks runs by name (bench/gpu_smoke.py RUNS)
  timeout 260 python3 -m bench.gpu_smoke --out "$OUT_DIR" --timeout 120 --runs "${GPU_SMOKE_RUNS:-}" 2>&1 | tee "$OUT_DIR/gpu_smoke.log" | tail -n 40
  smoke_rc=${PIPESTATUS[0]}
fi
# 2. The benchmark, in what is left of 8 minutes (GPU_TOTAL_S; sections that would start too late are recorded as
# skipped).
left=$((${GPU_TOTAL_S:-465} - SECONDS))
[ "$left" -lt 120 ] && left=120
timeout "$left" python3 -m bench.run --gpu "${QUICK[@]}" --budget-s $((left - 60)) \
  --out "$OUT_DIR/gpu_${STAMP}.json" --md "$OUT_DIR/BENCHMARKS_gpu.md" 2>&1 | tee "$OUT_DIR/bench_gpu.log" | tail -n 120
rc=${PIPESTATUS[0]}
echo "bench/gpu.sh: bench exit $rc, trainer smoke exit $smoke_rc, ${SECONDS} s; results in $OUT_DIR/gpu_${STAMP}.json" \
  "and $OUT_DIR/gpu_smoke.json"
[ "$rc" -eq 0 ] && [ "$smoke_rc" -eq 0 ]
