/*
 * Block top-k of a logits chunk the log-prob kernel has already loaded: the k (<= 64)
 * largest x = logit * inv_temp of the chunk, descending, ties to the lower column. Reads
 * no global memory and writes only the k (value, id) pairs.
 *
 * Where the chunk lives: the kernel copies it to shared memory (64 KB a block) as it
 * arrives, and the candidate code reads it there, so the registers that held it die in
 * the (m, s, w, t) sums and the kernel keeps the plain kernel's 80 registers and 3 blocks
 * an SM.
 *
 * Both chunk kernels keep the issue slots busy (the plain one at 3 instructions a cycle),
 * so the candidate code is written for few instructions a warp: work that only a few
 * threads have is spread over the lanes of a warp, and no step divides.
 *
 * Order: each element becomes a 48-bit composite (order-preserving key of x << 16 |
 * 0xFFFF - chunk column), unique within the chunk, so "larger composite" is exactly the
 * wanted order and the k-th largest composite separates the top k from the rest.
 *  1. A lower bound L of the chunk's k-th largest x from the threads' maxima (the max the
 *     log-prob kernel already took): each warp sorts its 32 maxima (a shuffle bitonic
 *     network) and lists its c = ceil(k / 8) largest; L is the k-th largest of those 8c
 *     values (each counted against the others), so at least k threads each hold an
 *     element >= L.
 *  2. Each warp takes the vectors of its threads whose max reaches L (a few threads a
 *     warp), one vector a lane, tests each vector's max, and has the elements of those
 *     that reach L (usually one or two a vector) compared and appended to a
 *     kTopKBuffer-entry shared buffer one element a lane.
 *  3. If they fit, each buffered candidate's rank is counted against the others (by as
 *     many lanes a candidate as rank them all in one pass) and the k best are written at
 *     their ranks. Otherwise (many large or equal values in few threads) a radix select
 *     over the chunk (six rounds of 8 bits, shared-memory histograms of counts) finds the
 *     k-th largest composite, exactly k elements are buffered and ranked the same way; it
 *     is out of line, as it runs rarely.
 * Counts and ranks are exact integers, so the result is deterministic.
 */
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/dtype.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kTopKBuffer = 512;

// fp32 -> uint32 with the order of the floats (nan excluded by the callers)
__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The composite of value x at chunk column col; -0 and +0 are one value (ties go by
// column, as on the CPU).
__device__ __forceinline__ uint64_t composite(float x, int col) {
  return (uint64_t(float_key(x == 0.f ? 0.f : x)) << 16) | uint64_t(0xFFFF - col);
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

// f(composite) for each of this thread's columns inside the row with x >= min_x, among
// the vectors whose bits are set in `stored` (bit j: vector j, kept at chunk[j * kThreads +
// threadIdx.x]; element q of it is chunk column (j * kThreads + i) * kVec + q, as the
// loads placed it). Each thread reads only its own vectors. A vector whose max is below
// min_x is skipped whole: x rounds monotonically, so no element of it can pass. One copy
// of the candidate code, in a loop over the set bits: unrolled over all 16 vectors it
// outgrew the instruction cache (ncu: 70% of the stalls on instruction fetch).
// f is copied (captures by value; shared arrays are static).
template <typename T, int kThreads, typename F>
__device__ __forceinline__ void for_each_composite(const uint4* chunk, unsigned stored,
                                                   int64_t cols_left, float inv_temp,
                                                   float min_x, F f) {
  constexpr int kVec = 16 / sizeof(T);
  while (stored != 0) {
    const int j = __ffs(stored) - 1;
    stored &= stored - 1;
    const uint4 v = chunk[j * kThreads + threadIdx.x];
    if (!(vector_max<T>(v) * inv_temp >= min_x)) continue;
    const int base = (j * kThreads + int(threadIdx.x)) * kVec;
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      const float x = to_float(e[q]) * inv_temp;
      if (x >= min_x && base + q < cols_left) f(composite(x, base + q));
    }
  }
}

// The value of a composite, as the float test of for_each_composite wants it.
__device__ __forceinline__ float composite_value(uint64_t c) {
  return key_float(uint32_t(c >> 16));
}

// Radix select of the k-th largest composite among the elements >= bound (six rounds of
// 8 bits over shared-memory histograms of counts), then the exactly k elements at or
// above it into buf; returns k. Out of line: it runs only when more than kTopKBuffer
// elements pass the bound (many large or equal values in few threads), and inlined its
// scans would hold the main path's registers.
template <typename T, int kThreads>
__device__ __noinline__ int radix_collect(const uint4* chunk, unsigned stored,
                                          int64_t cols_left, float inv_temp, int k,
                                          uint64_t bound, float bound_x, uint64_t* buf) {
  __shared__ int s_hist[256];
  __shared__ int s_count, s_digit, s_need;
  const int tid = threadIdx.x;
  uint64_t prefix = 0;
  int need = k;
  for (int shift = 40; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) s_hist[i] = 0;
    __syncthreads();
    for_each_composite<T, kThreads>(chunk, stored, cols_left, inv_temp, bound_x,
                                    [=](uint64_t c) {
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
  for_each_composite<T, kThreads>(chunk, stored, cols_left, inv_temp,
                                  composite_value(prefix), [=](uint64_t c) {
                                    if (c >= prefix) buf[atomicAdd(&s_count, 1)] = c;
                                  });
  __syncthreads();
  return s_count;
}

// Writes the chunk's k best (value, global id) pairs to vals[0, k), ids[0, k); places
// past the chunk's valid columns get (-inf, -1). chunk: the chunk in shared memory,
// kThreads * kVecs vectors, vector j of thread i at j * kThreads + i; cols_left: valid
// columns from the chunk start (may exceed the chunk); id_base: the global id of chunk
// column 0; thread_max: the max logit of this thread's loaded elements (-inf padding
// included). Every thread of the block must call it.
template <typename T, int kThreads, int kVecs>
__device__ void block_topk(const uint4* chunk, int64_t cols_left,
                           float inv_temp, int k, float thread_max, int64_t id_base,
                           float* __restrict__ vals, int64_t* __restrict__ ids) {
  constexpr int kWarps = kThreads / 32, kVec = 16 / sizeof(T);
  __shared__ float s_top[kWarps * 8];
  __shared__ float s_bound[kWarps];
  __shared__ uint8_t s_lane[kThreads];  // per warp: the lanes of its reaching threads
  __shared__ int s_queue[kThreads];     // per warp: vectors that reach the bound
  __shared__ uint64_t s_buf[kTopKBuffer];
  __shared__ int s_count;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warp_base = tid & ~31;
  const unsigned lanes_below = (1u << lane) - 1;
  static_assert(kThreads == 256,
                "the bound lists ceil(k / 8) <= 8 maxima of each of 8 warps, 4 lanes a value");
  static_assert(kVecs <= 32, "a bit per vector");
  constexpr int kChunkCols = kThreads * kVecs * kVec;
  const int valid = cols_left < kChunkCols ? int(cols_left) : kChunkCols;

  // 1: each warp's c = ceil(k / 8) largest thread maxima (x units; a thread without a valid
  // column, or with only nan, counts as -inf) by a descending bitonic sort over lanes; the
  // bound is the k-th largest of those 8c values: at least k threads, each with an
  // element, reach it
  const float top = thread_max * inv_temp;
  const float own = tid * kVec < valid && top == top ? top : -INFINITY;
  float v = own;
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, v, stride);
      const bool keep_max = ((lane & stride) == 0) == ((lane & size) == 0 || size == 32);
      v = keep_max ? fmaxf(v, o) : fminf(v, o);
    }
  }
  const int c = (k + 7) / 8, listed = kWarps * c;
  if (lane < c) s_top[warp * c + lane] = v;
  if (tid == 0) s_count = 0;
  __syncthreads();
  {
    // value i of the list counted by 4 neighbouring lanes, each over a quarter of it
    const int i = tid / 4, part = tid % 4;
    const float mine = i < listed ? s_top[i] : -INFINITY;
    int at_least = 0;
#pragma unroll 4
    for (int j = part; j < listed; j += 4) at_least += s_top[j] >= mine;
    at_least += __shfl_xor_sync(0xffffffffu, at_least, 1);
    at_least += __shfl_xor_sync(0xffffffffu, at_least, 2);
    float best = i < listed && at_least >= k ? mine : -INFINITY;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
      best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, off));
    if (lane == 0) s_bound[warp] = best;
  }
  __syncthreads();
  float bound_x = s_bound[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) bound_x = fmaxf(bound_x, s_bound[w]);

  // 2: each warp tests the vectors of its threads whose max reaches the bound a vector a
  // lane (neighbouring lanes: the same vector of neighbouring threads, neighbouring
  // addresses), and the elements of the vectors that reach the bound, an element a lane,
  // join the buffer
  const bool reaching = own >= bound_x;
  const unsigned reach_mask = __ballot_sync(0xffffffffu, reaching);
  if (reaching) s_lane[warp_base + __popc(reach_mask & lanes_below)] = lane;
  __syncwarp();
  const int reachers = __popc(reach_mask);
  // lane = rank r of a reaching thread + P * (vector offset), P = reachers rounded up to a
  // power of two (lanes with r >= reachers idle): no division, and a lane's thread fixed
  const int rank_bits = reachers > 1 ? 32 - __clz(reachers - 1) : 0;
  const int my_rank = lane & ((1 << rank_bits) - 1);
  const int owner = warp_base + (my_rank < reachers ? s_lane[warp_base + my_rank] : 0);
  const int vecs_per_round = 32 >> rank_bits;
  for (int first = 0; reachers > 0 && first < kVecs; first += vecs_per_round) {
    const int j = first + (lane >> rank_bits);
    int vec = -1;
    if (my_rank < reachers && j < kVecs) {
      const int at = j * kThreads + owner;
      if (vector_max<T>(chunk[at]) * inv_temp >= bound_x) vec = at;
    }
    const unsigned hits = __ballot_sync(0xffffffffu, vec >= 0);
    if (vec >= 0) s_queue[warp_base + __popc(hits & lanes_below)] = vec;
    __syncwarp();
    constexpr int kPerRound = 32 / kVec;
    const int n_hits = __popc(hits);
    for (int q = 0; q < n_hits; q += kPerRound) {
      const int slot = q + lane / kVec;
      if (slot < n_hits) {
        const int at = s_queue[warp_base + slot], col = at * kVec + lane % kVec;
        const float x = to_float(reinterpret_cast<const T*>(chunk + at)[lane % kVec]) * inv_temp;
        if (x >= bound_x && col < valid) {
          const int place = atomicAdd(&s_count, 1);
          if (place < kTopKBuffer) s_buf[place] = composite(x, col);
        }
      }
    }
    __syncwarp();
  }
  __syncthreads();
  int count = s_count;
  if (count > kTopKBuffer) {
    const unsigned stored = reaching ? (kVecs == 32 ? ~0u : (1u << kVecs) - 1) : 0u;
    count = radix_collect<T, kThreads>(chunk, stored, valid, inv_temp, k,
                                       composite(bound_x, 0xFFFF), bound_x, s_buf);
  }
  const int n = count < kTopKBuffer ? count : kTopKBuffer;
  // 3: each candidate's rank = the candidates above it, counted by `lanes` neighbouring
  // lanes (as many as still rank every candidate in one pass of the block, at most 32)
  // over interleaved parts of the buffer and added with shuffles; the loop over candidates
  // is uniform across each warp so that every lane takes the shuffles. Powers of two
  // throughout, so that no step divides.
  int lane_bits = 5;
  while (lane_bits > 0 && (kThreads >> lane_bits) < n) --lane_bits;
  const int lanes = 1 << lane_bits, per_pass = kThreads >> lane_bits, part = tid & (lanes - 1);
  const int trips = (n - part + lanes - 1) >> lane_bits;  // j = part + t * lanes < n
  for (int first = 0; first < n; first += per_pass) {
    const int i = first + (tid >> lane_bits);
    const uint64_t cand = i < n ? s_buf[i] : 0;
    int rank = 0;
    if (i < n)
#pragma unroll 4
      for (int t = 0; t < trips; ++t) rank += s_buf[part + (t << lane_bits)] > cand;
    for (int off = 1; off < lanes; off <<= 1) rank += __shfl_xor_sync(0xffffffffu, rank, off);
    if (i < n && part == 0 && rank < k) {
      vals[rank] = composite_value(cand);
      ids[rank] = id_base + (0xFFFF - int64_t(cand & 0xFFFF));
    }
  }
  for (int i = n + tid; i < k; i += kThreads) {
    vals[i] = -INFINITY;
    ids[i] = -1;
  }
}

// One block per row: the k best of the row's C chunk lists (vals, ids [rows, C, k], each
// descending with ties to the lower id and padded with (-inf, -1)) into out [rows, k].
// Each real candidate's place is its place in its own list plus, from every other list,
// the number of entries that come before it (value larger, or equal with a lower id): a
// prefix of that list, found by binary search. Places are distinct (ids are), so every
// candidate is written by one thread, without sorting and in any thread order.
__global__ void merge_candidates_kernel(const float* __restrict__ vals,
                                        const int64_t* __restrict__ ids, int chunks, int k,
                                        float* __restrict__ out_vals,
                                        int64_t* __restrict__ out_ids) {
  const int64_t row = blockIdx.x;
  const float* v = vals + row * chunks * k;
  const int64_t* id = ids + row * chunks * k;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    out_vals[row * k + i] = -INFINITY;
    out_ids[row * k + i] = -1;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < chunks * k; e += blockDim.x) {
    const int64_t my_id = id[e];
    if (my_id < 0) continue;
    const float x = v[e];
    const int own = e / k;
    int place = e - own * k;
    for (int c = 0; c < chunks && place < k; ++c) {
      if (c == own) continue;
      int lo = 0, hi = k;  // entries [0, lo) of list c come before (x, my_id)
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        const int64_t other = id[c * k + mid];
        const float y = v[c * k + mid];
        if (other >= 0 && (y > x || (y == x && other < my_id))) lo = mid + 1; else hi = mid;
      }
      place += lo;
    }
    if (place < k) {
      out_vals[row * k + place] = x;
      out_ids[row * k + place] = my_id;
    }
  }
}

}  // namespace cuda
}  // namespace tokenspeed
