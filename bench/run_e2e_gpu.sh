#!/bin/bash
# One device call for the engine: build, every GPU test of the suite, then the end-to-end
# scoring benchmark. Logs under $OUT (or ./gpu_logs).
#   bench/run_e2e_gpu.sh [tests] [sanitize] [scoring-1.5b] [scoring-7b]
set -o pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TORCH_EXTENSIONS_DIR=/tmp/tse_ext TOKENSPEED_BUILD_CUDA=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
stages=${*:-tests sanitize scoring-1.5b scoring-7b}
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
    sanitize)
      step sanitize
      for tool in memcheck racecheck; do
        timeout 100 compute-sanitizer --tool $tool --kernel-regex kns=tokenspeed --error-exitcode 9 \
          python3 -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py tests/test_fused_ops.py \
          -k "small and not fp32 and not opcheck and not compile" 2>&1 \
          | grep -v "^$" | tail -4 | tee "$OUT/sanitize_$tool.log" || status=1
      done ;;
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
