// Launchers of the log-prob kernels (logprobs.cuh) behind the plain interface of launch.h;
// the ops that call them live in logprobs_host.cpp.
#include "cuda/launch.h"
#include "cuda/logprobs.cuh"
#include "cuda/logprobs_mass.cuh"
#include "cuda/logprobs_topk.cuh"
#include "cuda/kept_set.cuh"

namespace tokenspeed {
namespace cuda {
namespace {

constexpr int kMergeThreads = 256;
static_assert(kLogprobChunkThreads == kLpThreads, "launch.h's chunk threads are the kernel's");

int chunk_cols(DType dtype) {
  return dtype == DType::kFloat32 ? lp_chunk_cols<float>() : lp_chunk_cols<__half>();
}

// f(T{}) for the element type of dtype
template <typename F>
void by_dtype(DType dtype, F f) {
  switch (dtype) {
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kFloat32: f(float{}); break;
  }
}

constexpr int kKeptSetThreads = 128;  // a warp a row

__global__ void __launch_bounds__(kKeptSetThreads)
    kept_set_kernel(const float* __restrict__ values, const int64_t* __restrict__ ids,
                    int64_t rows, int kc, const float* __restrict__ ref_m,
                    const float* __restrict__ big_s, const float* __restrict__ big_w,
                    const int64_t* __restrict__ top_k, const float* __restrict__ top_p,
                    const float* __restrict__ min_p, const float* __restrict__ pass,
                    float* __restrict__ tau, float* __restrict__ s_kept,
                    float* __restrict__ w_kept, bool* __restrict__ pending) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (r >= rows) return;  // the warp's lanes together
  const float pass_s = pass != nullptr ? pass[2 * r] : NAN;
  const float pass_w = pass != nullptr ? pass[2 * r + 1] : NAN;
  const KeptSet out = kept_set_warp(values + r * kc, ids + r * kc, kc, ref_m[r], big_s[r],
                                    big_w[r], top_k[r], top_p[r], min_p[r], pass_s, pass_w);
  if (threadIdx.x % 32 == 0) {
    tau[r] = out.tau;
    s_kept[r] = out.s;
    w_kept[r] = out.w;
    pending[r] = out.pending;
  }
}

}  // namespace

int64_t logprob_num_chunks(int64_t V, DType dtype) {
  return (V + chunk_cols(dtype) - 1) / chunk_cols(dtype);
}

cudaError_t launch_logprob_chunks(const void* logits, DType dtype, int64_t rows, int64_t ld,
                                  int64_t V, const void* targets, bool targets_int64,
                                  int64_t targets_stride, int64_t vocab_start, float inv_temp,
                                  float* state, float* thread_maxima, cudaStream_t stream) {
  const int64_t chunks = logprob_num_chunks(V, dtype);
  const auto blocks = static_cast<unsigned>(rows * chunks);
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* out = reinterpret_cast<float4*>(state);
    if (thread_maxima != nullptr)
      logprob_chunk_kernel<T, true><<<blocks, kLpThreads, 0, stream>>>(
          static_cast<const T*>(logits), ld, V, targets, targets_int64, targets_stride,
          vocab_start, inv_temp, out, static_cast<int>(chunks), thread_maxima);
    else
      logprob_chunk_kernel<T, false><<<blocks, kLpThreads, 0, stream>>>(
          static_cast<const T*>(logits), ld, V, targets, targets_int64, targets_stride,
          vocab_start, inv_temp, out, static_cast<int>(chunks), nullptr);
  });
  return cudaGetLastError();
}

cudaError_t launch_row_topk(const void* logits, DType dtype, int64_t rows, int64_t ld,
                            int64_t V, const float* thread_maxima, float inv_temp, int k,
                            int64_t vocab_start, float* vals, int64_t* ids,
                            cudaStream_t stream) {
  const int entries = static_cast<int>(logprob_num_chunks(V, dtype) * kLpThreads);
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    row_topk_kernel<T><<<static_cast<unsigned>(rows), kRowTopKThreads, 0, stream>>>(
        static_cast<const T*>(logits), ld, V, thread_maxima, entries, inv_temp, k,
        vocab_start, vals, ids);
  });
  return cudaGetLastError();
}

cudaError_t launch_mass_above(const void* logits, DType dtype, int64_t rows, int64_t ld,
                              int64_t V, float inv_temp, const float* thresholds, int64_t n,
                              const float* ref_m, float* out, cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto blocks = static_cast<unsigned>(rows);
    if (n == 1)
      mass_above_one_kernel<T><<<blocks, kMassThreads, 0, stream>>>(
          static_cast<const T*>(logits), ld, V, inv_temp, thresholds, ref_m, out);
    else
      mass_above_bins_kernel<T><<<blocks, kMassThreads, 0, stream>>>(
          static_cast<const T*>(logits), ld, V, inv_temp, thresholds, static_cast<int>(n), ref_m,
          out);
  });
  return cudaGetLastError();
}

cudaError_t launch_kept_set(const float* values, const int64_t* ids, int64_t rows, int kc,
                            const float* ref_m, const float* big_s, const float* big_w,
                            const int64_t* top_k, const float* top_p, const float* min_p,
                            const float* pass, float* tau, float* s_kept, float* w_kept,
                            bool* pending, cudaStream_t stream) {
  constexpr int kRows = kKeptSetThreads / 32;
  kept_set_kernel<<<static_cast<unsigned>((rows + kRows - 1) / kRows), kKeptSetThreads, 0,
                    stream>>>(values, ids, rows, kc, ref_m, big_s, big_w, top_k, top_p,
                              min_p, pass, tau, s_kept, w_kept, pending);
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
