// Launchers of the moe kernels (moe.cuh, grouped_gemm.cuh) behind moe_launch.h: dtype
// dispatch, grids and the grouped GEMM's choice of path.
// Never throws; returns the launch's error.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "cuda/dispatch.cuh"
#include "cuda/grouped_gemm.cuh"
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

int64_t grouped_gemm_workspace(int64_t E) { return 2 * (E + 1); }

cudaError_t launch_grouped_gemm(const void* x, const void* weight, DType dtype,
                                const void* offsets, bool offsets_int64, int64_t M, int64_t N,
                                int64_t K, int64_t E, int32_t* workspace, void* out,
                                cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  // tensor cores where every 16-byte chunk of a row is whole; the path depends on the
  // dtype and K alone, so a row's reduction order never changes with the batch
  const bool mma = dtype != DType::kFloat32 && K % 8 == 0;
  const int tile_m = mma ? gg::kMmaM : gg::kFmaM, tile_n = mma ? gg::kMmaN : gg::kFmaN;
  int32_t* bounds = workspace;
  int32_t* tile_starts = workspace + E + 1;
  if (offsets_int64) {
    gg::tiles_kernel<<<1, 1, 0, stream>>>(static_cast<const int64_t*>(offsets),
                                          static_cast<int>(E), M, tile_m, bounds, tile_starts);
  } else {
    gg::tiles_kernel<<<1, 1, 0, stream>>>(static_cast<const int32_t*>(offsets),
                                          static_cast<int>(E), M, tile_m, bounds, tile_starts);
  }
  // at most ceil(M / tile_m) + E row tiles: each expert wastes less than one
  const dim3 grid(blocks_for(M, tile_m) + static_cast<unsigned>(E), blocks_for(N, tile_n));
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* xt = static_cast<const T*>(x);
    const auto* wt = static_cast<const T*>(weight);
    auto* ot = static_cast<T*>(out);
    const int e = static_cast<int>(E), n = static_cast<int>(N), k = static_cast<int>(K);
    if constexpr (!std::is_same_v<T, float>) {
      if (mma) {
        gg::mma_kernel<T><<<grid, gg::kMmaThreads, 0, stream>>>(xt, wt, bounds, tile_starts, e,
                                                                 n, k, ot);
        return;
      }
    }
    gg::fma_kernel<T><<<grid, gg::kFmaThreads, 0, stream>>>(xt, wt, bounds, tile_starts, e, n,
                                                             k, ot);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tokenspeed
