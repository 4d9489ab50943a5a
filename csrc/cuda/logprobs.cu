// Launchers of the log-prob kernels (logprobs.cuh) behind the plain interface of launch.h;
// the ops that call them live in logprobs_host.cpp.
#include "cuda/launch.h"
#include "cuda/logprobs.cuh"
#include "cuda/logprobs_mass.cuh"

namespace tokenspeed {
namespace cuda {
namespace {

constexpr int kMergeThreads = 256;

int chunk_cols(DType dtype) {
  return dtype == DType::kFloat32 ? lp_chunk_cols<float>() : lp_chunk_cols<__half>();
}

}  // namespace

int64_t logprob_num_chunks(int64_t V, DType dtype) {
  return (V + chunk_cols(dtype) - 1) / chunk_cols(dtype);
}

cudaError_t launch_logprob_chunks(const void* logits, DType dtype, int64_t rows, int64_t ld,
                                  int64_t V, const void* targets, bool targets_int64,
                                  int64_t targets_stride, int64_t vocab_start, float inv_temp,
                                  float* state, int topk, float* cand_vals, int64_t* cand_ids,
                                  cudaStream_t stream) {
  const int64_t chunks = logprob_num_chunks(V, dtype);
  const auto blocks = static_cast<unsigned>(rows * chunks);
  cudaError_t err = cudaSuccess;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    auto* out = reinterpret_cast<float4*>(state);
    if (topk > 0) {
      // over the 48 KB default (set on every call: the setting is per device); the
      // carveout lets 3 blocks an SM hold their copies
      auto* kernel = logprob_chunk_kernel<T, true>;
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 kTopKChunkBytes);
      if (err == cudaSuccess)
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                   cudaSharedmemCarveoutMaxShared);
      if (err != cudaSuccess) return;
      kernel<<<blocks, kLpThreads, kTopKChunkBytes, stream>>>(
          static_cast<const T*>(logits), ld, V, targets, targets_int64, targets_stride,
          vocab_start, inv_temp, out, static_cast<int>(chunks), topk, cand_vals, cand_ids);
    } else {
      logprob_chunk_kernel<T, false><<<blocks, kLpThreads, 0, stream>>>(
          static_cast<const T*>(logits), ld, V, targets, targets_int64, targets_stride,
          vocab_start, inv_temp, out, static_cast<int>(chunks), 0, nullptr, nullptr);
    }
  };
  switch (dtype) {
    case DType::kBFloat16: launch(__nv_bfloat16{}); break;
    case DType::kFloat16: launch(__half{}); break;
    case DType::kFloat32: launch(float{}); break;
  }
  return err != cudaSuccess ? err : cudaGetLastError();
}

cudaError_t launch_mass_above(const void* logits, DType dtype, int64_t rows, int64_t ld,
                              int64_t V, float inv_temp, const float* thresholds, int64_t n,
                              const float* ref_m, float* out, cudaStream_t stream) {
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    const auto blocks = static_cast<unsigned>(rows);
    if (n == 1)
      mass_above_one_kernel<T><<<blocks, kMassThreads, 0, stream>>>(
          static_cast<const T*>(logits), ld, V, inv_temp, thresholds, ref_m, out);
    else
      mass_above_bins_kernel<T><<<blocks, kMassThreads, 0, stream>>>(
          static_cast<const T*>(logits), ld, V, inv_temp, thresholds, static_cast<int>(n), ref_m,
          out);
  };
  switch (dtype) {
    case DType::kBFloat16: launch(__nv_bfloat16{}); break;
    case DType::kFloat16: launch(__half{}); break;
    case DType::kFloat32: launch(float{}); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_merge_candidates(const float* vals, const int64_t* ids, int64_t rows,
                                    int64_t chunks, int64_t k, float* out_vals,
                                    int64_t* out_ids, cudaStream_t stream) {
  merge_candidates_kernel<<<static_cast<unsigned>(rows), 128, 0, stream>>>(
      vals, ids, static_cast<int>(chunks), static_cast<int>(k), out_vals, out_ids);
  return cudaGetLastError();
}

cudaError_t launch_merge_states(const float* states, int64_t row_stride, int64_t item_stride,
                                int64_t n, int64_t rows, float inv_temp, float* merged,
                                float* lp, float* ent, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((rows + kMergeThreads - 1) / kMergeThreads);
  merge_states_kernel<<<blocks, kMergeThreads, 0, stream>>>(
      reinterpret_cast<const float4*>(states), row_stride, item_stride, static_cast<int>(n),
      rows, inv_temp, reinterpret_cast<float4*>(merged), lp, ent);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tokenspeed
