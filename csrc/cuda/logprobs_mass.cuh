/*
 * The sampler filters' second pass: per row, the mass of the tokens at or above each of
 * n (<= 256) thresholds, sum e^(x - ref_m) and sum e^(x - ref_m) (x - ref_m) over
 * x >= threshold, x = logit * inv_temp in fp32. Never writes anything but [n, 2] a row.
 *
 * One block per row. The thresholds are placed in ascending order in shared memory (each
 * thread counts the smaller ones: n <= 256 = one per thread; nan thresholds keep
 * nothing); each logit is binary-searched to the largest threshold at or below it and
 * added to that bin (shared-memory float atomics, so the last bits of a sum may differ
 * between runs); suffix sums of the bins give every threshold's mass. It runs only for
 * rows whose kept set the top-k candidates do not settle, so it favours brevity.
 */
#pragma once

#include <cstdint>

#include "cuda/dtype.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kMassThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kMassThreads)
    mass_above_kernel(const T* __restrict__ logits, int64_t ld, int64_t V, float inv_temp,
                      const float* __restrict__ thresholds, int n,
                      const float* __restrict__ ref_m, float* __restrict__ out) {
  __shared__ float s_thr[kMassThreads];
  __shared__ int s_place[kMassThreads];
  __shared__ float s_bin[kMassThreads][2];
  __shared__ int s_valid;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const float* th = thresholds + row * n;
  if (tid == 0) s_valid = 0;
  s_bin[tid][0] = s_bin[tid][1] = 0.f;
  __syncthreads();
  if (tid < n) {
    const float t = th[tid];
    int place = -1;
    if (t == t) {
      place = 0;
      for (int j = 0; j < n; ++j) {
        const float u = th[j];
        place += (u == u) && (u < t || (u == t && j < tid));
      }
      s_thr[place] = t;
      atomicAdd(&s_valid, 1);
    }
    s_place[tid] = place;
  }
  __syncthreads();
  const int valid = s_valid;
  const float m = ref_m[row];
  const T* rowp = logits + row * ld;
  for (int64_t j = tid; j < V; j += kMassThreads) {
    const float x = to_float(rowp[j]) * inv_temp;
    if (!(x > -INFINITY)) continue;  // -inf adds nothing; nan is never kept
    int lo = 0, hi = valid;  // thresholds <= x: [0, lo)
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (s_thr[mid] <= x) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) continue;
    const float d = x - m, p = expf(d);
    atomicAdd(&s_bin[lo - 1][0], p);
    atomicAdd(&s_bin[lo - 1][1], p * d);
  }
  __syncthreads();
  if (tid == 0) {
    float s = 0.f, w = 0.f;
    for (int i = valid - 1; i >= 0; --i) {
      s += s_bin[i][0];
      w += s_bin[i][1];
      s_bin[i][0] = s;
      s_bin[i][1] = w;
    }
  }
  __syncthreads();
  if (tid < n) {
    const int place = s_place[tid];
    out[(row * n + tid) * 2] = place < 0 ? 0.f : s_bin[place][0];
    out[(row * n + tid) * 2 + 1] = place < 0 ? 0.f : s_bin[place][1];
  }
}

}  // namespace cuda
}  // namespace tokenspeed
