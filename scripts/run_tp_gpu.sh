#!/bin/bash
# One device call on a machine with 2+ GPUs (nvidia-h200-x2): build, the NCCL tensor-parallel
# tests, the TP log-prob benchmark, then the single-GPU suite. Logs under $OUT (or ./gpu_logs).
#   scripts/run_tp_gpu.sh [tp_tests] [bench_tp] [gpu_tests] [profile] [scoring_tp]
#                         [weight_sync]
source "$(dirname "$0")/gpu_common.sh"
stages=${*:-tp_tests bench_tp gpu_tests}
build
nvidia-smi topo -m 2>&1 | tee -a "$OUT/gpu.txt"
for s in $stages; do
  case $s in
    tp_tests)
      step tp_tests
      timeout 240 python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_tp.py 2>&1 \
        | tee "$OUT/tp_tests.log" | tail -25 || status=1 ;;
    bench_tp)
      step bench_tp
      timeout 120 python3 bench/bench_tp_logprobs.py --tp 2 2>&1 | tee "$OUT/bench_tp.log" | tail -20 || status=1
      timeout 120 python3 bench/bench_tp_logprobs.py --tp 2 --top-logprobs 20 2>&1 \
        | tee "$OUT/bench_tp_top20.log" | tail -6 || status=1 ;;
    scoring_tp)
      # tokens/s and memory per GPU at tp_size 2 against 1, MoE and dense
      step scoring_tp
      timeout 400 python3 bench/bench_scoring.py --models qwen3-30b-a3b-12l --workloads grpo \
        --grpo-prompts 16 --budgets 16384 --ref-subset 2 --no-deterministic --tp-sizes 1 2 \
        --root /tmp/ckpt 2>&1 | tee "$OUT/scoring_tp_moe.log" | grep -v Loading | tail -6 || status=1
      timeout 400 python3 bench/bench_scoring.py --models qwen2.5-7b --workloads grpo \
        --grpo-prompts 24 --budgets 16384 --ref-subset 2 --no-deterministic --tp-sizes 1 2 \
        --root /tmp/ckpt 2>&1 | tee "$OUT/scoring_tp_7b.log" | grep -v Loading | tail -6 || status=1 ;;
    weight_sync)
      step weight_sync
      timeout 240 python3 bench/bench_weight_sync.py --layers 4 --reps 3 2>&1 \
        | tee "$OUT/weight_sync.log" | tail -10 || status=1 ;;
    gpu_tests)
      step gpu_tests
      timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests --ignore tests/test_tp.py 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -25 || status=1 ;;
    profile)
      step profile
      timeout 150 python3 bench/profile_engine.py --model qwen2.5-1.5b --workload grpo --root /tmp/ckpt 2>&1 \
        | tee "$OUT/profile.log" | tail -45 || status=1 ;;
  esac
done
exit $status
