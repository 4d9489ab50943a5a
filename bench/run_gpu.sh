#!/bin/bash
# One device call: build (CPU + CUDA ops), GPU tests, compute-sanitizer on the small kernel
# tests, then the kernel benchmarks. Logs go under $OUT (or ./gpu_logs).
#   bench/run_gpu.sh [build] [test] [sanitize] [bench_logprobs] [bench_attention] [ncu]
# PYTEST_ARGS adds pytest options to the test stage (e.g. --deselect ID).
set -o pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TORCH_EXTENSIONS_DIR=/tmp/tse_ext TOKENSPEED_BUILD_CUDA=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
stages=${*:-build test bench_logprobs bench_attention sanitize}
status=0
step() { echo "=== $1 ($(date +%T))"; }
for s in $stages; do
  case $s in
    build)
      step build
      nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv \
        | tee "$OUT/gpu.txt"
      { time python3 -c "import tokenspeed_ext as t; print(t.BUILD)"; } 2>&1 | tee "$OUT/build.log" \
        || exit 1 ;;
    test)
      step test
      timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider ${PYTEST_ARGS:-} \
        tests/test_ops_cuda.py tests/test_ops.py tests/test_fused_ops.py 2>&1 | tail -40 | tee "$OUT/tests.log" || status=1 ;;
    sanitize)
      step sanitize
      for tool in memcheck racecheck; do
        timeout 100 compute-sanitizer --tool $tool --kernel-regex kns=tokenspeed --error-exitcode 9 \
          python3 -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py -k "small and not fp16 and not fp32" 2>&1 \
          | grep -v "^$" | tail -15 | tee "$OUT/sanitize_$tool.log" || status=1
        timeout 100 compute-sanitizer --tool $tool --kernel-regex kns=tokenspeed --error-exitcode 9 \
          python3 -m pytest -q -p no:cacheprovider tests/test_fused_ops.py \
          -k "cuda and not opcheck and not compile" 2>&1 \
          | grep -v "^$" | tail -15 | tee "$OUT/sanitize_fused_$tool.log" || status=1
      done ;;
    bench_logprobs)
      step bench_logprobs
      timeout 240 python3 bench/bench_logprobs.py 2>&1 | tee "$OUT/bench_logprobs.log" | tail -16 ;;
    bench_attention)
      step bench_attention
      timeout 240 python3 bench/bench_attention.py 2>&1 | tee "$OUT/bench_attention.log" | tail -12 ;;
    ncu)
      step ncu
      timeout 240 ncu --clock-control none --target-processes all -k regex:paged_attention \
        -c 1 --section SpeedOfLight --section Occupancy python3 bench/bench_attention.py \
        --models qwen2.5-7b --reps 1 2>&1 | tail -60 | tee "$OUT/ncu.log" ;;
  esac
done
exit $status
