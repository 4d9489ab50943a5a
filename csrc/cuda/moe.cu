// Launchers of the moe kernels (moe.cuh) behind moe_launch.h: dtype dispatch and grids.
// Never throws; returns the launch's error.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/dispatch.cuh"
#include "cuda/moe.cuh"
#include "cuda/moe_launch.h"

namespace tokenspeed {
namespace cuda {
namespace {

unsigned blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

}  // namespace

int64_t moe_route_smem_bytes(int64_t E) {
  return moe::kRouteWarps * E * static_cast<int64_t>(sizeof(float));
}

cudaError_t launch_moe_route(const void* logits, DType dtype, int64_t ld, int64_t rows,
                             int64_t E, int64_t k, bool renormalize, const int32_t* forced,
                             float* weights, int32_t* ids, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const auto smem = static_cast<size_t>(moe_route_smem_bytes(E));
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    moe::route_kernel<T><<<blocks_for(rows, moe::kRouteWarps), moe::kRouteWarps * 32, smem,
                           stream>>>(static_cast<const T*>(logits), ld, rows,
                                     static_cast<int>(E), static_cast<int>(k), renormalize,
                                     forced, weights, ids);
  });
  return cudaGetLastError();
}

cudaError_t launch_moe_dispatch(const int32_t* ids, int64_t pairs, int64_t k, int64_t E,
                                int32_t* offsets, int32_t* sorted_tokens, int32_t* pair_rows,
                                cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(offsets, 0, (E + 1) * sizeof(int32_t), stream);
  if (err != cudaSuccess || pairs == 0) return err;
  const auto hist_bytes = static_cast<size_t>(E) * sizeof(int);
  moe::count_kernel<<<blocks_for(pairs, moe::kCountThreads * moe::kCountRun),
                      moe::kCountThreads, hist_bytes, stream>>>(ids, pairs,
                                                                static_cast<int>(E), offsets);
  moe::scan_kernel<<<1, 1, 0, stream>>>(offsets, static_cast<int>(E));
  moe::place_kernel<<<static_cast<unsigned>(E), moe::kPlaceThreads, 0, stream>>>(
      ids, pairs, static_cast<int>(k), offsets, sorted_tokens, pair_rows);
  return cudaGetLastError();
}

cudaError_t launch_moe_combine(const void* y, DType dtype, int64_t ld_y,
                               const int32_t* pair_rows, const float* weights, int64_t tokens,
                               int64_t k, int64_t H, void* out, cudaStream_t stream) {
  if (tokens == 0 || H == 0) return cudaSuccess;
  const auto threads = static_cast<unsigned>(std::min<int64_t>(256, (H + 31) / 32 * 32));
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    moe::combine_kernel<T><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
        static_cast<const T*>(y), ld_y, pair_rows, weights, static_cast<int>(k), H,
        static_cast<T*>(out));
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tokenspeed
