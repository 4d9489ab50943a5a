/*
 * The sampler filters' second pass: per row, the mass of the tokens at or above each of
 * n (<= 256) thresholds, sum e^(x - ref_m) and sum e^(x - ref_m) (x - ref_m) over
 * x >= threshold, x = logit * inv_temp rounded to fp32 (as the candidates' values are).
 * Never writes anything but [n, 2] a row.
 *
 * Every output is a function of the row's values, the temperature, the row's thresholds
 * and ref_m alone, bit for bit: not of T, of the other rows, of where the row starts in
 * memory, nor of the timing of a run. One block of 256 threads per row walks the row in
 * segments of 256 threads x 4 vectors of 16 bytes (8192 columns in 16-bit types, 4096 in
 * fp32); element e of vector j of thread i is column c0 + (j * 256 + i) * kVec + e, the
 * chunk kernel's layout (logprobs.cuh, load_columns): 16-byte loads on a row that starts
 * 16-byte aligned, scalar loads of the same elements into the same registers otherwise,
 * -inf past V. Every thread sees its elements in the order segment, j, e.
 *
 * One threshold (a top-k tie past the candidates, a min-p or top-p set larger than them:
 * the usual second pass), mass_above_one_kernel: each thread adds its elements into one
 * (s, w) pair in registers, then a fixed xor butterfly in each warp and the 8 warp sums
 * added in warp order.
 *
 * n > 1 (the top-p radix search, rare), mass_above_bins_kernel: the valid thresholds are
 * placed in ascending order in shared memory (ties by index; a nan threshold keeps
 * nothing) and each x is binary-searched to the bin of the largest threshold at or below
 * it. Each warp owns 256 bins in shared memory and fills them in an order fixed by the
 * columns: at each step its 32 lanes hold the same (segment, j, e) element of their
 * threads, write (p, p (x - ref_m)) to the warp's scratch, and for every bin hit, the
 * lowest lane of the lanes sharing it (__match_any_sync) adds their values to the bin in
 * ascending lane order. The 8 warps' bins are then added in warp order, and suffix sums
 * over the bins give every threshold's mass (never larger for a larger threshold; equal
 * thresholds get equal sums). One read of the row and one exp per element serve all 256
 * thresholds; the price of the fixed order is that lanes sharing a bin add one after
 * another (most x fall into few bins in the search's first pass), as the shared-memory
 * atomics this replaced serialised on one address, without their run-to-run order. A pass
 * per threshold instead would read the row and take its exps 256 times.
 */
#pragma once

#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/logprobs.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kMassThreads = 256;
constexpr int kMassWarps = kMassThreads / 32;
constexpr int kMassVecs = 4;            // 16-byte vectors per thread per segment
constexpr int kMassBins = kMassThreads;  // n <= 256: one threshold per thread to place

// f(x) for x = logit * inv_temp of every column of a row in the fixed order above, and
// f(-inf) for the padding past V up to the end of the last segment. Every thread of the
// block calls f equally often, so f may hold warp collectives.
template <typename T, typename F>
__device__ __forceinline__ void for_each_x(const T* __restrict__ rowp, int64_t V,
                                           float inv_temp, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int64_t kSegment = int64_t(kMassThreads) * kMassVecs * kVec;
  const bool aligned = (reinterpret_cast<uintptr_t>(rowp) & 15) == 0;
  for (int64_t c0 = 0; c0 < V; c0 += kSegment) {
    uint4 raw[kMassVecs];
    load_columns<T, kMassThreads, kMassVecs>(rowp, V, c0, aligned, raw);
#pragma unroll
    for (int j = 0; j < kMassVecs; ++j) {
      const T* e = reinterpret_cast<const T*>(&raw[j]);
      // rounded on its own (never fused into x - ref_m), as the thresholds were made
#pragma unroll
      for (int q = 0; q < kVec; ++q) f(__fmul_rn(to_float(e[q]), inv_temp));
    }
  }
}

// One threshold a row. logits [rows, V] (row stride ld elements), thresholds and ref_m
// [rows] fp32, out [rows, 1, 2].
template <typename T>
__global__ void __launch_bounds__(kMassThreads)
    mass_above_one_kernel(const T* __restrict__ logits, int64_t ld, int64_t V, float inv_temp,
                          const float* __restrict__ thresholds, const float* __restrict__ ref_m,
                          float* __restrict__ out) {
  __shared__ float2 warp_sw[kMassWarps];
  const int64_t row = blockIdx.x;
  const float t = thresholds[row], m = ref_m[row];
  float s = 0.f, w = 0.f;
  for_each_x(logits + row * ld, V, inv_temp, [&](float x) {
    // nan keeps nothing (x >= nan is false); -inf adds nothing
    if (x >= t && x > -INFINITY) {
      const float d = x - m, p = expf(d);
      s += p;
      w = fmaf(p, d, w);
    }
  });
  const float2 acc = block_sum_pair<kMassThreads>(s, w, warp_sw);
  if (threadIdx.x == 0) {
    out[row * 2] = acc.x;
    out[row * 2 + 1] = acc.y;
  }
}

// 2 <= n <= 256 thresholds a row. logits [rows, V] (row stride ld elements), thresholds
// [rows, n] fp32 contiguous, ref_m [rows] fp32, out [rows, n, 2].
template <typename T>
__global__ void __launch_bounds__(kMassThreads)
    mass_above_bins_kernel(const T* __restrict__ logits, int64_t ld, int64_t V, float inv_temp,
                           const float* __restrict__ thresholds, int n,
                           const float* __restrict__ ref_m, float* __restrict__ out) {
  __shared__ float s_thr[kMassBins];             // the valid thresholds, ascending
  __shared__ int s_place[kMassBins];             // threshold i's place in s_thr, -1: nan
  __shared__ float2 s_bin[kMassWarps][kMassBins];  // (sum p, sum p d) of each warp
  __shared__ float2 s_lane[kMassWarps][32];      // a warp's step: each lane's (p, p d)
  __shared__ int s_valid;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const float* th = thresholds + row * n;
  const float m = ref_m[row];

  if (tid == 0) s_valid = 0;
  for (int i = tid; i < kMassWarps * kMassBins; i += kMassThreads)
    s_bin[i / kMassBins][i % kMassBins] = make_float2(0.f, 0.f);
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
      atomicAdd(&s_valid, 1);  // a count: the same whatever the order
    }
    s_place[tid] = place;
  }
  __syncthreads();
  const int valid = s_valid;
  float2* bins = s_bin[warp];
  float2* lanes = s_lane[warp];
  for_each_x(logits + row * ld, V, inv_temp, [&](float x) {
    int bin = -1;  // none for -inf, nan, or x below every threshold
    float2 v = make_float2(0.f, 0.f);
    if (x > -INFINITY) {
      int lo = 0, hi = valid;  // thresholds <= x: [0, lo)
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (s_thr[mid] <= x) lo = mid + 1; else hi = mid;
      }
      if (lo > 0) {
        const float d = x - m, p = expf(d);
        bin = lo - 1;
        v = make_float2(p, p * d);
      }
    }
    lanes[lane] = v;
    const unsigned group = __match_any_sync(0xffffffffu, bin);
    __syncwarp();
    if (bin >= 0 && lane == __ffs(group) - 1) {
      float2 acc = bins[bin];
      for (unsigned g = group; g != 0; g &= g - 1) {
        const float2 u = lanes[__ffs(g) - 1];
        acc.x += u.x;
        acc.y += u.y;
      }
      bins[bin] = acc;
    }
    __syncwarp();  // the bins and the scratch are settled before the next step
  });
  __syncthreads();
  if (tid < valid) {
    float2 acc = s_bin[0][tid];
#pragma unroll
    for (int i = 1; i < kMassWarps; ++i) {
      acc.x += s_bin[i][tid].x;
      acc.y += s_bin[i][tid].y;
    }
    s_bin[0][tid] = acc;
  }
  __syncthreads();
  if (tid == 0) {
    float2 acc = make_float2(0.f, 0.f);
    for (int i = valid - 1; i >= 0; --i) {
      acc.x += s_bin[0][i].x;
      acc.y += s_bin[0][i].y;
      s_bin[0][i] = acc;
    }
  }
  __syncthreads();
  if (tid < n) {
    const int place = s_place[tid];
    const float2 sum = place < 0 ? make_float2(0.f, 0.f) : s_bin[0][place];
    out[(row * n + tid) * 2] = sum.x;
    out[(row * n + tid) * 2 + 1] = sum.y;
  }
}

}  // namespace cuda
}  // namespace tokenspeed
