#!/bin/bash
# One device call for the engine: build, every GPU test of the suite, then the end-to-end
# scoring benchmark. Logs under $OUT (or ./gpu_logs).
#   scripts/run_e2e_gpu.sh [tests] [scoring-1.5b] [scoring-7b]
source "$(dirname "$0")/gpu_common.sh"
stages=${*:-tests scoring-1.5b scoring-7b}
build
for s in $stages; do
  case $s in
    tests)
      step tests
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -25 || status=1 ;;
    scoring-1.5b)
      step scoring-1.5b
      timeout 200 python3 bench/bench_scoring.py --models qwen2.5-1.5b --budgets 16384 32768 \
        --ref-subset 32 --root /tmp/ckpt 2>&1 \
        | tee "$OUT/scoring_1.5b.log" | tail -14 || status=1 ;;
    scoring-7b)
      step scoring-7b
      timeout 400 python3 bench/bench_scoring.py --models qwen2.5-7b --workloads grpo uniform \
        --budgets 16384 32768 --ref-subset 8 --root /tmp/ckpt 2>&1 | tee "$OUT/scoring_7b.log" | tail -14 || status=1 ;;
  esac
done
exit $status
