/*
 * Row top-k after the log-prob chunk kernel: the k (<= 64) largest x = logit * inv_temp
 * of each row, descending, ties to the lower column, found from the thread maxima the
 * chunk kernel wrote (one float per thread and chunk: the max it takes anyway) and a few
 * vectors of the row read again. Writes only the k (value, id) pairs of each row.
 *
 * Why a second kernel: the chunk kernel issues instructions most of its time (the plain
 * one at 3 a cycle, DRAM at 90%), so any selection work inside it, and the block
 * barriers it needs, is paid at the rate of the whole read. Out here the selection sees
 * the whole row at once, so its bound is the row's, not a chunk's: about k candidates a
 * row instead of about k a chunk, and no lists to merge.
 *
 * One block of 256 threads per row, every count an exact integer (the result is a
 * function of the row alone):
 *  1. Bound: the entries are the row's C * 256 thread maxima (entry c * 256 + i: thread i
 *     of chunk c, whose elements are the columns c * kCols + (j * 256 + i) * kVec + e).
 *     A radix select over their order-preserving keys (shared-memory histograms of 8-bit
 *     digits, most significant first) narrows to the k-th largest and stops, after two
 *     rounds at least (they fix a bf16 value), as soon as the entries at or above the
 *     bucket's floor are at most k + kSlack. The floor L is a lower bound of the row's
 *     k-th largest x: at least k threads, each with an element, reach it; and only threads
 *     whose max reaches L hold elements >= L.
 *  2. Candidates: the reaching threads are listed, their 16 vectors each are read again
 *     (a vector a thread of the block: about 16 x k of the row's 16-byte vectors), and
 *     every element >= L joins a shared buffer as a 64-bit composite (key of x << 32 |
 *     ~column), unique in the row, so "larger composite" is exactly the wanted order.
 *  3. Each candidate's rank is counted against the others; the k best are written at
 *     their ranks. Where ties defeat the bound (more than kMaxReach threads or kTopKBuffer
 *     elements reach it: constant or heavily quantised rows), a radix select over the
 *     composites (eight rounds of 8 bits, reading the reaching threads' vectors each
 *     round) finds the k-th largest and exactly k are ranked; out of line, as it is rare.
 */
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/dtype.cuh"
#include "cuda/logprobs.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kRowTopKThreads = 256;
constexpr int kTopKBuffer = 512;  // candidates ranked in shared memory
constexpr int kMaxReach = 512;    // reaching threads listed
constexpr int kSlack = 16;        // reaching threads past k where the bound search stops

// fp32 -> uint32 with the order of the floats, -0 and +0 one value (nan: the callers
// map it to -inf first)
__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t u = __float_as_uint(x == 0.f ? 0.f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// the key of -inf: every non-nan key is at least this (a smaller one decodes to a nan)
constexpr uint32_t kNegInfKey = 0x007FFFFFu;

// The key of a thread max in x units; nan (a thread of nan logits) counts as -inf.
__device__ __forceinline__ uint32_t max_key(float thread_max, float inv_temp) {
  const float x = thread_max * inv_temp;
  return x == x ? float_key(x) : kNegInfKey;
}

// Where the composite's column sits: ties go to the lower column.
__device__ __forceinline__ uint64_t composite(float x, int64_t col) {
  return (uint64_t(float_key(x)) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(col));
}

__device__ __forceinline__ float composite_value(uint64_t c) { return key_float(uint32_t(c >> 32)); }

__device__ __forceinline__ int64_t composite_column(uint64_t c) {
  return int64_t(0xFFFFFFFFu - uint32_t(c & 0xFFFFFFFFu));
}

// The largest element of a 16-byte vector (nan ignored as fmaxf does; nan if all are).
template <typename T>
__device__ __forceinline__ float vector_max(const uint4& v) {
  if constexpr (sizeof(T) == 4) {
    return fmaxf(fmaxf(__uint_as_float(v.x), __uint_as_float(v.y)),
                 fmaxf(__uint_as_float(v.z), __uint_as_float(v.w)));
  } else {
    using P = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;
    const P* p = reinterpret_cast<const P*>(&v);
    const P m = __hmax2(__hmax2(p[0], p[1]), __hmax2(p[2], p[3]));
    return fmaxf(to_float(m.x), to_float(m.y));
  }
}

// Vector j of entry e (thread e % 256 of chunk e / 256) of a row, as the chunk kernel
// loaded it: a 16-byte load where the row starts 16-byte aligned and the vector is whole,
// else its elements one by one, -inf past V. Returns the first column.
template <typename T>
__device__ __forceinline__ int64_t entry_vector(const T* __restrict__ rowp, int64_t V,
                                                bool aligned, int e, int j, uint4& v) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t col = int64_t(e / kLpThreads) * lp_chunk_cols<T>() +
                      (int64_t(j) * kLpThreads + e % kLpThreads) * kVec;
  if (aligned && col + kVec <= V) {
    v = *reinterpret_cast<const uint4*>(rowp + col);
  } else {
    T* x = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int q = 0; q < kVec; ++q) x[q] = col + q < V ? rowp[col + q] : T(-INFINITY);
  }
  return col;
}

// f(composite) for every element x >= bound_x (nan never) inside the row in vector j of
// entry e, for the tasks t = e-list index * kLpVecs + j this thread takes; entry_of(i)
// gives the i-th listed entry or -1 (not reaching). A vector whose max is below the bound
// is skipped whole: x rounds monotonically, so none of its elements can pass.
template <typename T, typename EntryOf, typename F>
__device__ __forceinline__ void for_each_candidate(const T* __restrict__ rowp, int64_t V,
                                                   bool aligned, float inv_temp,
                                                   float bound_x, int listed,
                                                   EntryOf entry_of, F f) {
  constexpr int kVec = 16 / sizeof(T);
  for (int t = threadIdx.x; t < listed * kLpVecs; t += blockDim.x) {
    const int e = entry_of(t / kLpVecs);
    if (e < 0) continue;
    uint4 v;
    const int64_t col = entry_vector<T>(rowp, V, aligned, e, t % kLpVecs, v);
    if (!(vector_max<T>(v) * inv_temp >= bound_x)) continue;
    const T* x = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      const float xq = to_float(x[q]) * inv_temp;
      if (xq >= bound_x && col + q < V) f(composite(xq, col + q));
    }
  }
}

// Warp 0: in a histogram of 256 digits (larger digit = larger key), the digit d where
// the count from the top reaches need; writes it, the need left inside d, and the count
// of d itself. Lane l owns digits [8l, 8l + 8).
__device__ __forceinline__ void find_digit(const int* hist, int need, int* out_digit,
                                           int* out_need, int* out_count) {
  const int lane = threadIdx.x;
  int total = 0;
#pragma unroll
  for (int b = 0; b < 8; ++b) total += hist[lane * 8 + b];
  int suffix = total;  // the digits of lanes >= this one
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int other = __shfl_down_sync(0xffffffffu, suffix, off);
    if (lane + off < 32) suffix += other;
  }
  int acc = suffix - total;
  if (acc < need && suffix >= need) {
    for (int b = 7; b >= 0; --b) {
      const int h = hist[lane * 8 + b];
      if (acc + h >= need) {
        *out_digit = lane * 8 + b;
        *out_need = need - acc;
        *out_count = h;
        break;
      }
      acc += h;
    }
  }
}

// Ranks the n (<= kTopKBuffer) distinct composites of buf and writes the k best, padding
// the places past n with (-inf, -1): each candidate's rank is the number above it,
// counted by `lanes` neighbouring lanes over interleaved parts of the buffer (as many as
// still rank every candidate in one pass of the block, at most 32) and added with
// shuffles; powers of two throughout.
__device__ __forceinline__ void rank_and_write(const uint64_t* buf, int n, int k,
                                               int64_t id_base, float* __restrict__ vals,
                                               int64_t* __restrict__ ids) {
  constexpr int kThreads = kRowTopKThreads;
  const int tid = threadIdx.x;
  int lane_bits = 5;
  while (lane_bits > 0 && (kThreads >> lane_bits) < n) --lane_bits;
  const int lanes = 1 << lane_bits, per_pass = kThreads >> lane_bits, part = tid & (lanes - 1);
  const int trips = (n - part + lanes - 1) >> lane_bits;  // j = part + t * lanes < n
  for (int first = 0; first < n; first += per_pass) {
    const int i = first + (tid >> lane_bits);
    const uint64_t cand = i < n ? buf[i] : 0;
    int rank = 0;
    if (i < n)
#pragma unroll 4
      for (int t = 0; t < trips; ++t) rank += buf[part + (t << lane_bits)] > cand;
    for (int off = 1; off < lanes; off <<= 1) rank += __shfl_xor_sync(0xffffffffu, rank, off);
    if (i < n && part == 0 && rank < k) {
      vals[rank] = composite_value(cand);
      ids[rank] = id_base + composite_column(cand);
    }
  }
  for (int i = n + tid; i < k; i += kThreads) {
    vals[i] = -INFINITY;
    ids[i] = -1;
  }
}

// The rare path: the exactly min(k, candidates) largest composites among the elements
// >= bound_x of every entry whose key reaches bound_key, into buf; returns their count.
// A count first, then, if there are more than k, a radix select of the k-th largest
// composite (eight rounds of 8 bits), each pass reading the reaching vectors again.
template <typename T>
__device__ __noinline__ int collect_by_select(const T* __restrict__ rowp, int64_t V,
                                              bool aligned, float inv_temp,
                                              const float* __restrict__ maxima, int entries,
                                              uint32_t bound_key, int k, uint64_t* buf) {
  __shared__ int s_hist[256];
  __shared__ int s_count, s_digit, s_need, s_unused;
  const int tid = threadIdx.x;
  const float bound_x = key_float(bound_key);
  auto entry_of = [=](int i) { return max_key(maxima[i], inv_temp) >= bound_key ? i : -1; };
  if (tid == 0) s_count = 0;
  __syncthreads();
  for_each_candidate<T>(rowp, V, aligned, inv_temp, bound_x, entries, entry_of,
                        [](uint64_t) { atomicAdd(&s_count, 1); });
  __syncthreads();
  uint64_t threshold = 0;  // every candidate when there are at most k
  if (s_count > k) {
    int need = k;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += blockDim.x) s_hist[i] = 0;
      __syncthreads();
      for_each_candidate<T>(rowp, V, aligned, inv_temp, bound_x, entries, entry_of,
                            [=](uint64_t c) {
        if (shift == 56 || (c >> (shift + 8)) == (threshold >> (shift + 8)))
          atomicAdd(&s_hist[(c >> shift) & 255], 1);
      });
      __syncthreads();
      if (tid < 32) find_digit(s_hist, need, &s_digit, &s_need, &s_unused);
      __syncthreads();
      threshold |= uint64_t(s_digit) << shift;
      need = s_need;
    }
  }
  __syncthreads();
  if (tid == 0) s_count = 0;
  __syncthreads();
  // threshold is the k-th largest composite (or 0): at most k elements reach it
  for_each_candidate<T>(rowp, V, aligned, inv_temp, bound_x, entries, entry_of,
                        [=](uint64_t c) {
                          if (c >= threshold) buf[atomicAdd(&s_count, 1)] = c;
                        });
  __syncthreads();
  return s_count;
}

// Block r: row r. logits [T, V] (row stride ld), maxima [T, entries] (the chunk kernel's
// thread maxima in logit units, entries = C * 256); writes vals [T, k] (x) and ids [T, k]
// (global ids: id_base + column).
template <typename T>
__global__ void __launch_bounds__(kRowTopKThreads)
    row_topk_kernel(const T* __restrict__ logits, int64_t ld, int64_t V,
                    const float* __restrict__ maxima, int entries, float inv_temp, int k,
                    int64_t id_base, float* __restrict__ vals, int64_t* __restrict__ ids) {
  __shared__ int s_hist[256];
  __shared__ int s_digit, s_need, s_count_at, s_reached, s_count;
  __shared__ int s_reach[kMaxReach];
  __shared__ uint64_t s_buf[kTopKBuffer];
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const T* rowp = logits + row * ld;
  const float* mx = maxima + row * entries;
  const bool aligned = (reinterpret_cast<uintptr_t>(rowp) & 15) == 0;
  vals += row * k;
  ids += row * k;

  // 1: the bound, a radix select over the entries' keys that stops once few reach it
  uint32_t prefix = 0;
  int need = k, reaching = entries;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kRowTopKThreads) s_hist[i] = 0;
    if (tid == 0) s_reached = 0;
    __syncthreads();
    for (int e = tid; e < entries; e += kRowTopKThreads) {
      const uint32_t key = max_key(mx[e], inv_temp);
      if (shift == 24 || (key >> (shift + 8)) == (prefix >> (shift + 8)))
        atomicAdd(&s_hist[(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (tid < 32) find_digit(s_hist, need, &s_digit, &s_need, &s_count_at);
    __syncthreads();
    prefix |= uint32_t(s_digit) << shift;
    reaching = k - s_need + s_count_at;  // entries at or above the floor of prefix
    need = s_need;
    // two rounds at least (they fix a bf16 value), then stop once few reach the floor
    if (shift <= 16 && reaching <= k + kSlack) break;  // the same on every thread
  }
  const uint32_t bound_key = prefix > kNegInfKey ? prefix : kNegInfKey;
  const float bound_x = key_float(bound_key);

  // 2: the reaching entries listed, their elements >= the bound buffered
  int n = kTopKBuffer + 1;
  if (reaching <= kMaxReach) {
    if (tid == 0) s_count = 0;
    for (int e = tid; e < entries; e += kRowTopKThreads)
      if (max_key(mx[e], inv_temp) >= bound_key) s_reach[atomicAdd(&s_reached, 1)] = e;
    __syncthreads();
    for_each_candidate<T>(rowp, V, aligned, inv_temp, bound_x, reaching,
                          [](int i) { return s_reach[i]; }, [](uint64_t c) {
                            const int place = atomicAdd(&s_count, 1);
                            if (place < kTopKBuffer) s_buf[place] = c;
                          });
    __syncthreads();
    n = s_count;
  }
  if (n > kTopKBuffer)
    n = collect_by_select<T>(rowp, V, aligned, inv_temp, mx, entries, bound_key, k, s_buf);
  // 3: ranks
  rank_and_write(s_buf, n, k, id_base, vals, ids);
}

}  // namespace cuda
}  // namespace tokenspeed
