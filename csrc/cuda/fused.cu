// Launchers of the fused decoder-layer ops (kernels in fused.cuh) behind launch.h: dtype
// and vector-width dispatch, block sizes. Never throws; returns the launch's error.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "cuda/dispatch.cuh"
#include "cuda/fused.cuh"
#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {
namespace {

// Threads for a row of `units` vectors: whole warps, at most 1024, as few as take the
// row in the same number of rounds, so every round is nearly full (a row of 1120 vectors,
// SiLU-mul at 1.5B widths, takes 576 threads twice, not 1024 and then 96: the block's
// time is its rounds, and smaller blocks pack more rows onto an SM).
unsigned threads_for(int64_t units) {
  const int64_t n = std::max<int64_t>(1, units);
  const int64_t rounds = (n + 1023) / 1024;
  const int64_t warps = (n + rounds * 32 - 1) / (rounds * 32);
  return static_cast<unsigned>(warps * 32);
}

fused::Rows rows_of(RowLayout l) { return fused::Rows{l.m, l.s0, l.s1}; }

}  // namespace

cudaError_t launch_rms_norm(const void* x, RowLayout x_rows, const void* residual,
                            RowLayout res_rows, const void* weight, void* out, void* h_out,
                            DType dtype, int64_t rows, int64_t h, float eps, bool vec16,
                            cudaStream_t stream) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    auto launch = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      fused::rms_norm_kernel<T, V><<<static_cast<unsigned>(rows), threads_for(h / V), 0,
                                     stream>>>(
          static_cast<const T*>(x), rows_of(x_rows), static_cast<const T*>(residual),
          rows_of(res_rows), static_cast<const T*>(weight), static_cast<T*>(out),
          static_cast<T*>(h_out), h, 1.0f / static_cast<float>(h), eps);
    };
    if (vec16)
      launch(std::integral_constant<int, kVec>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return cudaGetLastError();
}

cudaError_t launch_silu_and_mul(const void* gate_up, int64_t ld, void* out, DType dtype,
                                int64_t rows, int64_t inter, bool vec16, cudaStream_t stream) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    auto launch = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      fused::silu_and_mul_kernel<T, V><<<static_cast<unsigned>(rows), threads_for(inter / V),
                                         0, stream>>>(static_cast<const T*>(gate_up), ld,
                                                      static_cast<T*>(out), inter);
    };
    if (vec16)
      launch(std::integral_constant<int, kVec>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return cudaGetLastError();
}

cudaError_t launch_rotary_embedding(const void* positions, bool positions_int64, void* q,
                                    int64_t q_token_stride, int64_t q_head_stride, int hq,
                                    void* k, int64_t k_token_stride, int64_t k_head_stride,
                                    int hk, const float* cache, int64_t max_pos, int half,
                                    DType dtype, int64_t n, bool vec16,
                                    cudaStream_t stream) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    auto launch = [&](const auto* pos, auto vec) {
      using P = std::remove_cv_t<std::remove_pointer_t<decltype(pos)>>;
      constexpr int V = decltype(vec)::value;
      const unsigned threads = threads_for(int64_t(hq + hk) * (half / V));
      fused::rotary_kernel<T, P, V><<<static_cast<unsigned>(n), threads, 0, stream>>>(
          pos, static_cast<T*>(q), q_token_stride, q_head_stride, hq, static_cast<T*>(k),
          k_token_stride, k_head_stride, hk, cache, max_pos, half);
    };
    auto with_vec = [&](const auto* pos) {
      if (vec16)
        launch(pos, std::integral_constant<int, kVec>{});
      else
        launch(pos, std::integral_constant<int, 1>{});
    };
    if (positions_int64)
      with_vec(static_cast<const int64_t*>(positions));
    else
      with_vec(static_cast<const int32_t*>(positions));
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tokenspeed
