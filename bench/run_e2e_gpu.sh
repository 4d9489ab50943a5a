#!/bin/bash
# One device call for the engine: build, every GPU test of the suite, then the end-to-end
# scoring benchmark. Logs under $OUT (or ./gpu_logs).
#   bench/run_e2e_gpu.sh [tests] [scoring-1.5b] [scoring-7b]
set -o pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TORCH_EXTENSIONS_DIR=/tmp/tse_ext TOKENSPEED_BUILD_CUDA=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
stages=${*:-tests scoring-1.5b scoring-7b}
status=0
step() { echo "=== $1 ($(date +%T))"; }
step build
{ time python3 -c "import tokenspeed_ext as t; print(t.BUILD); t.Scheduler" ; } 2>&1 | tee "$OUT/build.log" || exit 1
for s in $stages; do
  case $s in
    tests)
      step tests
      timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -25 || status=1 ;;
    scoring-1.5b)
      step scoring-1.5b
      timeout 150 python3 bench/bench_scoring.py --models qwen2.5-1.5b --budgets 16384 32768 --root /tmp/ckpt 2>&1 \
        | tee "$OUT/scoring_1.5b.log" | tail -14 || status=1 ;;
    scoring-7b)
      step scoring-7b
      timeout 170 python3 bench/bench_scoring.py --models qwen2.5-7b --workloads grpo \
        --budgets 16384 --ref-subset 0 --root /tmp/ckpt 2>&1 | tee "$OUT/scoring_7b.log" | tail -14 || status=1 ;;
  esac
done
exit $status
