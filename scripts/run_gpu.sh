#!/bin/bash
# One device call: build (CPU + CUDA ops), GPU tests, compute-sanitizer on the small kernel
# tests, then the kernel benchmarks. Logs go under $OUT (or ./gpu_logs).
#   scripts/run_gpu.sh [build] [test] [sanitize] [bench_logprobs] [bench_attention] [ncu] [sass]
#                      [bench_rich] [bench_moe] [bench_server] [bench_weight_sync]
# bench_server needs the server extra (fastapi, uvicorn) importable.
# PYTEST_ARGS adds pytest options to the test stage (e.g. --deselect ID).
source "$(dirname "$0")/gpu_common.sh"
stages=${*:-build test bench_logprobs bench_attention sanitize}
for s in $stages; do
  case $s in
    build) build ;;
    test)
      step test
      timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider ${PYTEST_ARGS:-} \
        tests/test_logprobs.py tests/test_attention.py tests/test_kv_cache.py tests/test_fused.py \
        tests/test_rich.py tests/test_head.py tests/test_head_partials.py 2>&1 \
        | tail -40 | tee "$OUT/tests.log" || status=1 ;;
    sanitize)
      # the kernel tests marked sanitize: log-probs, the fused head, store_kv, both attention kernels
      step sanitize
      for tool in memcheck racecheck synccheck; do
        # racecheck: the grouped_gemm kernels alone in a process (grouped_gemm_probe.py)
        skip=""; [ $tool = racecheck ] && skip="not grouped_gemm and not cuda_matches_cpu"
        timeout 100 compute-sanitizer --tool $tool --kernel-name kns=tokenspeed --error-exitcode 9 \
          python3 -m pytest -q -p no:cacheprovider -m sanitize tests ${skip:+-k "$skip"} 2>&1 \
          | grep -v "^$" | tail -4 | tee "$OUT/sanitize_$tool.log" || status=1
      done
      for args in "72 0,130,3,0,200 bad" "72 128 i32 fp16" "20 0,130,3,0,200 bad i32"; do
        timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 \
          python3 scripts/grouped_gemm_probe.py $args 2>&1 | tail -2 \
          | tee -a "$OUT/sanitize_racecheck_grouped_gemm.log" || status=1
      done ;;
    bench_logprobs)
      step bench_logprobs
      timeout 240 python3 bench/bench_logprobs.py 2>&1 | tee "$OUT/bench_logprobs.log" | tail -16 ;;
    bench_attention)
      # page 16 (the engine's) with each request's pages consecutive (TMA where a half
      # tile's pages run on; the same cache also read as page 64) and shuffled (gathers),
      # then 64 (TMA a page at a time), then head dim 64 against the mma.sync kernel
      step bench_attention
      for args in "--page 16 --layout consecutive --view-page 64" "--page 16" "--page 64" \
          "--models qwen2.5-0.5b llama-3.2-1b --layout consecutive --variants mma_sync"; do
        timeout 240 python3 bench/bench_attention.py $args 2>&1 \
          | tee -a "$OUT/bench_attention.log" | tail -12
      done ;;
    bench_rich)
      step bench_rich
      timeout 200 python3 bench/bench_logprobs.py --rich --t 16384 --reps 10 2>&1 \
        | tee "$OUT/bench_rich.log" | tail -8 ;;
    bench_moe)
      step bench_moe
      timeout 200 python3 bench/bench_moe.py 2>&1 | tee "$OUT/bench_moe.log" | tail -12 ;;
    bench_server)
      step bench_server
      timeout 240 python3 bench/bench_server.py --model qwen2.5-1.5b --device cuda --requests 64 \
        --prompt-len 128 2048 --completion-median 512 --clients 1 8 64 2>&1 \
        | tee "$OUT/bench_server.log" | tail -8 ;;
    bench_weight_sync)
      step bench_weight_sync
      timeout 240 python3 bench/bench_weight_sync.py --layers 4 --reps 3 2>&1 \
        | tee "$OUT/bench_weight_sync.log" | tail -8 ;;
    sass)
      # the wgmma attention kernel's machine code, and where it touches local memory
      step sass
      so=$(find /tmp/tse_ext -name 'tokenspeed_ops_cuda*.so' | head -1)
      cuobjdump -sass "$so" | awk '/Function : .*paged_attention_wgmma/{on=1} /Function : /&&!/wgmma/{on=0} on' \
        > "$OUT/wgmma.sass"
      grep -c "LDL\|STL" "$OUT/wgmma.sass" | sed 's/^/local-memory instructions: /'
      grep -n "LDL\|STL\|BAR.SYNC\|WARPGROUP.ARRIVE\|BRA" "$OUT/wgmma.sass" | head -80 ;;
    ncu)
      step ncu
      timeout 240 ncu --clock-control none --target-processes all -k regex:paged_attention \
        -c 1 --section SpeedOfLight --section Occupancy python3 bench/bench_attention.py \
        --models qwen2.5-7b --reps 1 2>&1 | tail -60 | tee "$OUT/ncu.log" ;;
  esac
done
exit $status
