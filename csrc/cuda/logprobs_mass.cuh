/*
 * The sampler filters' second pass: per row, the mass of the tokens at or above each of
 * n (<= 256) thresholds, sum e^(x - ref_m) and sum e^(x - ref_m) (x - ref_m) over
 * x >= threshold, x = logit * inv_temp in fp32. Never writes anything but [n, 2] a row.
 *
 * One block per row, reading the row in 16-byte vectors (four in flight a thread). With one
 * threshold (a top-k tie past the candidates, a min-p or top-p set larger than them: the
 * usual second pass) each thread sums its elements in registers and the block adds the
 * sums in a fixed order. With n > 1 (the top-p radix search, rare) the thresholds are
 * placed in ascending order in shared memory (each thread counts the smaller ones: n <=
 * 256 = one per thread; nan thresholds keep nothing); each logit is binary-searched to the
 * largest threshold at or below it and added to that bin (shared-memory float atomics,
 * so the last bits of a sum may differ between runs); suffix sums of the bins give every
 * threshold's mass.
 */
#pragma once

#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/logprobs.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kMassThreads = 256;

// f(x) for x = logit * inv_temp of every column of a row, 16-byte loads where the row is
// aligned, four in flight per thread.
template <typename T, typename F>
__device__ __forceinline__ void for_each_x(const T* __restrict__ rowp, int64_t V,
                                           float inv_temp, F&& f) {
  constexpr int kVec = 16 / sizeof(T), kBatch = 4;
  const int tid = threadIdx.x;
  int64_t done = 0;
  if ((reinterpret_cast<uintptr_t>(rowp) & 15) == 0) {
    const int64_t vecs = V / kVec;
    constexpr int64_t kStep = int64_t(kBatch) * kMassThreads;
    for (int64_t base = 0; base < vecs; base += kStep) {
      uint4 raw[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int64_t j = base + b * kMassThreads + tid;
        if (j < vecs) raw[b] = ld_stream16(rowp + j * kVec);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (base + b * kMassThreads + tid >= vecs) continue;
        const T* e = reinterpret_cast<const T*>(&raw[b]);
#pragma unroll
        for (int q = 0; q < kVec; ++q) f(to_float(e[q]) * inv_temp);
      }
    }
    done = vecs * kVec;
  }
  for (int64_t j = done + tid; j < V; j += kMassThreads) f(to_float(rowp[j]) * inv_temp);
}

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
  const float m = ref_m[row];
  const T* rowp = logits + row * ld;

  if (n == 1) {
    // nan keeps nothing: x >= nan is false
    const float t = th[0];
    float s = 0.f, w = 0.f;
    for_each_x(rowp, V, inv_temp, [&](float x) {
      if (x >= t && x > -INFINITY) {
        const float d = x - m, p = expf(d);
        s += p;
        w = fmaf(p, d, w);
      }
    });
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      s += __shfl_xor_sync(0xffffffffu, s, off);
      w += __shfl_xor_sync(0xffffffffu, w, off);
    }
    if (tid % 32 == 0) {
      s_bin[tid / 32][0] = s;
      s_bin[tid / 32][1] = w;
    }
    __syncthreads();
    if (tid == 0) {
      for (int i = 1; i < kMassThreads / 32; ++i) {
        s += s_bin[i][0];
        w += s_bin[i][1];
      }
      out[row * 2] = s;
      out[row * 2 + 1] = w;
    }
    return;
  }

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
  for_each_x(rowp, V, inv_temp, [&](float x) {
    if (!(x > -INFINITY)) return;  // -inf adds nothing; nan is never kept
    int lo = 0, hi = valid;  // thresholds <= x: [0, lo)
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (s_thr[mid] <= x) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return;
    const float d = x - m, p = expf(d);
    atomicAdd(&s_bin[lo - 1][0], p);
    atomicAdd(&s_bin[lo - 1][1], p * d);
  });
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
