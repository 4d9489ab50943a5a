# Sourced by the scripts/run_*_gpu.sh scripts (one device call each): logs under $OUT (or
# ./gpu_logs), the extension built into /tmp/tse_ext with CUDA required, NVLink multicast
# left off as the machines set it, and `step` / `build` for their stages.
set -o pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TORCH_EXTENSIONS_DIR=/tmp/tse_ext
export TOKENSPEED_BUILD_CUDA=1 PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
status=0
step() { echo "=== $1 ($(date +%T))"; }
# the GPU(s) seen, then both extensions built (op library and scheduler)
build() {
  step build
  nvidia-smi --query-gpu=index,name,clocks.sm,clocks.mem,power.draw,memory.total --format=csv \
    | tee "$OUT/gpu.txt"
  { time python3 -c "import tokenspeed_ext as t; print(t.BUILD); t.Scheduler"; } 2>&1 \
    | tee "$OUT/build.log" || exit 1
}
