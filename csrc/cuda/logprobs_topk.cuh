/*
 * Block top-k of a logits chunk held in registers: the k (<= 64) largest
 * x = logit * inv_temp of the chunk a block of the log-prob kernel has already loaded,
 * descending, ties to the lower column. Reads no memory beyond those registers and writes
 * only the k (value, id) pairs.
 *
 * Order: each element becomes a 48-bit composite (order-preserving key of x << 16 |
 * 0xFFFF - chunk column), unique within the chunk, so "larger composite" is exactly the
 * wanted order and the k-th largest composite separates the top k from the rest.
 *  1. Every thread's largest composite; the k-th largest of those 256 (by rank counting
 *     in shared memory) bounds the k-th largest element from below, since k distinct
 *     threads each hold an element at or above it.
 *  2. The elements at or above that bound (usually about k: only the k best threads can
 *     hold any) are appended to a 256-entry shared buffer.
 *  3. If they fit, each buffered candidate's rank is counted against the others and the
 *     k best are written at their ranks. Otherwise (many large values in few threads) a
 *     radix select over the registers (six rounds of 8 bits, shared-memory histograms of
 *     counts) finds the k-th largest composite, exactly k elements are buffered and
 *     ranked the same way.
 * Counts and ranks are exact integers, so the result is deterministic.
 */
#pragma once

#include <cstdint>

#include "cuda/dtype.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kTopKBuffer = 256;

// fp32 -> uint32 with the order of the floats (nan excluded by the callers)
__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// f(composite) for each of this thread's columns inside the row (x not nan). Element q of
// vector j of thread i is chunk column (j * kThreads + i) * kVec + q, as the loads place it.
template <typename T, int kThreads, int kVecs, typename F>
__device__ __forceinline__ void for_each_composite(const uint4 (&raw)[kVecs], int64_t cols_left,
                                                   float inv_temp, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const T* e = reinterpret_cast<const T*>(&raw[j]);
    const int base = (j * kThreads + int(threadIdx.x)) * kVec;
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      float x = to_float(e[q]) * inv_temp;
      if (x == 0.f) x = 0.f;  // -0 and +0 are one value: ties go by column, as on the CPU
      if (base + q < cols_left && x == x)
        f((uint64_t(float_key(x)) << 16) | uint64_t(0xFFFF - (base + q)));
    }
  }
}

// Writes the chunk's k best (value, global id) pairs to vals[0, k), ids[0, k); places
// past the chunk's valid columns get (-inf, -1). cols_left: valid columns from the chunk
// start (may exceed the chunk); id_base: the global id of chunk column 0. Every thread of
// the block must call it.
template <typename T, int kThreads, int kVecs>
__device__ void block_topk(const uint4 (&raw)[kVecs], int64_t cols_left, float inv_temp, int k,
                           int64_t id_base, float* __restrict__ vals,
                           int64_t* __restrict__ ids) {
  __shared__ uint64_t s_best[kThreads];
  __shared__ uint64_t s_buf[kTopKBuffer];
  __shared__ int s_hist[256];
  __shared__ int s_count, s_digit, s_need;
  __shared__ uint64_t s_bound;
  const int tid = threadIdx.x;

  uint64_t best = 0;  // 0: no valid column in this thread
  for_each_composite<T, kThreads>(raw, cols_left, inv_temp,
                                  [&](uint64_t c) { best = c > best ? c : best; });
  s_best[tid] = best;
  if (tid == 0) {
    s_count = 0;
    s_bound = 1;  // fewer than k threads with a valid column: every valid element
  }
  __syncthreads();
  if (best != 0) {
    int rank = 0;
    for (int i = 0; i < kThreads; ++i) rank += s_best[i] > best;
    if (rank == k - 1) s_bound = best;
  }
  __syncthreads();
  const uint64_t bound = s_bound;
  for_each_composite<T, kThreads>(raw, cols_left, inv_temp, [&](uint64_t c) {
    if (c >= bound) {
      const int slot = atomicAdd(&s_count, 1);
      if (slot < kTopKBuffer) s_buf[slot] = c;
    }
  });
  __syncthreads();
  int count = s_count;
  if (count > kTopKBuffer) {
    uint64_t prefix = 0;
    int need = k;
    for (int shift = 40; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kThreads) s_hist[i] = 0;
      __syncthreads();
      for_each_composite<T, kThreads>(raw, cols_left, inv_temp, [&](uint64_t c) {
        if (c >= bound && (c >> (shift + 8)) == (prefix >> (shift + 8)))
          atomicAdd(&s_hist[(c >> shift) & 255], 1);
      });
      __syncthreads();
      if (tid < 32) {
        // lane l owns digits [8l, 8l + 8); find the digit where the count from the top
        // reaches need
        int total = 0;
#pragma unroll
        for (int b = 0; b < 8; ++b) total += s_hist[tid * 8 + b];
        int suffix = total;  // digits of lanes >= this one
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const int other = __shfl_down_sync(0xffffffffu, suffix, off);
          if (tid + off < 32) suffix += other;
        }
        int acc = suffix - total;
        if (acc < need && suffix >= need) {
          for (int b = 7; b >= 0; --b) {
            const int h = s_hist[tid * 8 + b];
            if (acc + h >= need) {
              s_digit = tid * 8 + b;
              s_need = need - acc;
              break;
            }
            acc += h;
          }
        }
      }
      __syncthreads();
      prefix |= uint64_t(s_digit) << shift;
      need = s_need;
      __syncthreads();
    }
    // prefix is the k-th largest composite: exactly k elements are at or above it
    if (tid == 0) s_count = 0;
    __syncthreads();
    for_each_composite<T, kThreads>(raw, cols_left, inv_temp, [&](uint64_t c) {
      if (c >= prefix) s_buf[atomicAdd(&s_count, 1)] = c;
    });
    __syncthreads();
    count = s_count;
  }
  const int n = count < kTopKBuffer ? count : kTopKBuffer;
  for (int i = tid; i < n; i += kThreads) {
    const uint64_t c = s_buf[i];
    int rank = 0;
    for (int j = 0; j < n; ++j) rank += s_buf[j] > c;
    if (rank < k) {
      vals[rank] = key_float(uint32_t(c >> 16));
      ids[rank] = id_base + (0xFFFF - int64_t(c & 0xFFFF));
    }
  }
  for (int i = n + tid; i < k; i += kThreads) {
    vals[i] = -INFINITY;
    ids[i] = -1;
  }
}

}  // namespace cuda
}  // namespace tokenspeed
