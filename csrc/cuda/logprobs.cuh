/*
 * Fused log-prob gather: log_softmax(logits / temperature)[t, target[t]] and the row
 * entropy in one streaming pass over each logits row.
 *
 * Fuses: temperature scaling (a multiply in registers, applied to differences from the
 * max), max, sum of exp, the entropy moment and the target gather. Never writes [T, V]
 * (nor any exp/log-softmax tensor); the only intermediate in memory is a [T, C, 4] fp32
 * state (C = ceil(V / chunk)).
 *
 * Tiling: a 1-D grid of T * C blocks, block b reducing chunk b % C of row b / C: columns
 * [c * kCols, (c + 1) * kCols) with kCols = 256 threads x 16 vectors x (16 / sizeof(T))
 * (32768 columns for bf16/fp16, 16384 for fp32: 64 KB per block). Each thread issues all
 * 16 of its 16-byte loads before the first use (streaming, L1 not allocated) and keeps
 * them raw in registers; thread 0 loads the target id and then the target logit while
 * they are in flight. The max is taken on the packed raw values (bf16x2/half2 max) and
 * reduced over the block first; the exponentials, relative to that block max, run in
 * fp32 with two independent accumulator pairs (without a clamp an element on whole
 * chunks: a thread whose sums come out nan, from a -inf or nan logit, loads its part again
 * and sums it with the clamp that gives those the weight 0), and the block adds them up
 * with plain shuffles and one shared-memory pass (no rescaling). Per chunk the state is
 *   m = max x,  s = sum e^(x - m),  w = sum e^(x - m) (x - m),  t = x[target] or -inf
 * (m and t held in logit units until the end, x - m formed exactly before scaling), every
 * reduction a fixed butterfly followed by the warps in order. A second kernel merges a
 * row's C states in chunk order (the same merge serves vocabulary shards). The chunking and every
 * reduction order are fixed in column space, so a row's result depends neither on T nor
 * on the other rows, nor on whether its row start happens to be 16-byte aligned (an
 * unaligned row loads the same elements into the same threads with scalar loads).
 *
 * The kMaxima instantiation (logprob_topk_partials) computes the same state and also
 * writes each thread's max logit, [T, C, 256] fp32 (1/64 of bf16 logits), from which
 * row_topk_kernel (logprobs_topk.cuh) finds each row's k largest x reading only a few of
 * its vectors again.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "cuda/dtype.cuh"
#include "cuda/fast_math.cuh"
#include "cuda/lp_state.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kLpThreads = 256;
constexpr int kLpVecs = 16;  // 16-byte vectors per thread per chunk

template <typename T>
constexpr int lp_chunk_cols() {
  return kLpThreads * kLpVecs * int(16 / sizeof(T));
}

// A streaming 16-byte load (L1 not allocated) at p + kOffset bytes, the offset an
// immediate of the instruction
template <int kOffset = 0>
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4+%5];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p), "n"(kOffset));
  return r;
}

template <int kStride, int... J>
__device__ __forceinline__ void load_strided(const void* p, uint4* raw,
                                             std::integer_sequence<int, J...>) {
  ((raw[J] = ld_stream16<J * kStride>(p)), ...);
}

// The kVecs 16-byte vectors of thread threadIdx.x (of kThreads) in the column segment that
// starts at c0 of a row: element e of vector j holds column c0 + (j * kThreads +
// threadIdx.x) * kVec + e, -inf past V. 16-byte loads where the row starts 16-byte
// aligned, else scalar loads of the same elements into the same places, so the registers,
// and every summation order built on them, never depend on where the row sits in memory.
// A whole aligned segment (every chunk of a row but its last) takes the loads from one
// address and immediate offsets, without a bounds test each.
template <typename T, int kThreads, int kVecs>
__device__ __forceinline__ void load_columns(const T* __restrict__ rowp, int64_t V, int64_t c0,
                                             bool aligned, uint4 (&raw)[kVecs]) {
  constexpr int kVec = 16 / sizeof(T);
  if (aligned && c0 + int64_t(kThreads) * kVecs * kVec <= V) {
    load_strided<kThreads * 16>(rowp + c0 + threadIdx.x * kVec, raw,
                                std::make_integer_sequence<int, kVecs>{});
    return;
  }
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int64_t col = c0 + (int64_t(j) * kThreads + threadIdx.x) * kVec;
    if (aligned && col + kVec <= V) {
      raw[j] = ld_stream16(rowp + col);
    } else {
      T* e = reinterpret_cast<T*>(&raw[j]);
#pragma unroll
      for (int k = 0; k < kVec; ++k) e[k] = col + k < V ? rowp[col + k] : T(-INFINITY);
    }
  }
}

// Max over all kLpVecs raw vectors: packed pairs for 16-bit types (NaN-ignoring like fmaxf).
template <typename T>
__device__ __forceinline__ float raw_max(const uint4 (&raw)[kLpVecs]) {
  if constexpr (sizeof(T) == 4) {
    float a[4] = {__uint_as_float(raw[0].x), __uint_as_float(raw[0].y),
                  __uint_as_float(raw[0].z), __uint_as_float(raw[0].w)};
#pragma unroll
    for (int j = 1; j < kLpVecs; ++j) {
      a[0] = fmaxf(a[0], __uint_as_float(raw[j].x));
      a[1] = fmaxf(a[1], __uint_as_float(raw[j].y));
      a[2] = fmaxf(a[2], __uint_as_float(raw[j].z));
      a[3] = fmaxf(a[3], __uint_as_float(raw[j].w));
    }
    return fmaxf(fmaxf(a[0], a[1]), fmaxf(a[2], a[3]));
  } else {
    using P = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;
    P a[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) a[k] = reinterpret_cast<const P*>(&raw[0])[k];
#pragma unroll
    for (int j = 1; j < kLpVecs; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) a[k] = __hmax2(a[k], reinterpret_cast<const P*>(&raw[j])[k]);
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < 4; ++k) m = fmaxf(m, fmaxf(to_float(a[k].x), to_float(a[k].y)));
    return m;
  }
}

// This thread's sums over its chunk elements, relative to the block max m in scaled log2
// units c: s = sum 2^d, w = sum 2^d d with d = (x - m) c, two accumulator pairs. kClamp:
// d clamped to -1e30 first, so that a -inf x adds 0 to w (not 0 * -inf) and a nan x adds
// nothing (fmaxf drops nan); without it the sums are the same bits for finite x (2^d is 0
// below -1e30 either way) and nan otherwise.
template <typename T, bool kClamp>
__device__ __forceinline__ void chunk_sums(const uint4 (&raw)[kLpVecs], float m, float c,
                                           float& s, float& w) {
  constexpr int kVec = 16 / sizeof(T);
  float s0 = 0.f, s1 = 0.f, w0 = 0.f, w1 = 0.f;
#pragma unroll
  for (int j = 0; j < kLpVecs; ++j) {
    const T* e = reinterpret_cast<const T*>(&raw[j]);
#pragma unroll
    for (int k = 0; k < kVec; k += 2) {
      float d0 = (to_float(e[k]) - m) * c, d1 = (to_float(e[k + 1]) - m) * c;
      if constexpr (kClamp) {
        d0 = fmaxf(d0, -1e30f);
        d1 = fmaxf(d1, -1e30f);
      }
      const float p0 = exp2_ftz(d0), p1 = exp2_ftz(d1);
      s0 += p0;
      s1 += p1;
      w0 = fmaf(p0, d0, w0);
      w1 = fmaf(p1, d1, w1);
    }
  }
  s = s0 + s1;
  w = w0 + w1;
}

// The block's sums of a (s, w) pair in a fixed order: a butterfly in each warp, then the
// warps added in order by thread 0, the only thread whose result is the total. warp_sw:
// shared memory of one float2 per warp.
template <int kThreads>
__device__ __forceinline__ float2 block_sum_pair(float s, float w, float2* warp_sw) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, off);
    w += __shfl_xor_sync(0xffffffffu, w, off);
  }
  if (threadIdx.x % 32 == 0) warp_sw[threadIdx.x / 32] = make_float2(s, w);
  __syncthreads();
  float2 acc = warp_sw[0];
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 1; i < kThreads / 32; ++i) {
      acc.x += warp_sw[i].x;
      acc.y += warp_sw[i].y;
    }
  }
  return acc;
}

// Block b: chunk b % num_chunks of row b / num_chunks. logits [T, V] (row stride ld
// elements), targets [T] int32/int64 (stride tgt_stride), global ids of a shard starting
// at vocab_start; state out [T, C, 4]. kMaxima: also each thread's max logit into
// thread_maxima [T, C, kLpThreads] (-inf for a thread past V, nan for one of only nan).
template <typename T, bool kMaxima>
__global__ void __launch_bounds__(kLpThreads, 3)
    logprob_chunk_kernel(const T* __restrict__ logits, int64_t ld, int64_t V,
                         const void* __restrict__ targets, bool tgt64, int64_t tgt_stride,
                         int64_t vocab_start, float inv_temp, float4* __restrict__ state,
                         int num_chunks, float* __restrict__ thread_maxima) {
  constexpr int kCols = lp_chunk_cols<T>();
  const int64_t row = blockIdx.x / num_chunks;
  const int chunk = static_cast<int>(blockIdx.x - row * num_chunks);
  const T* rowp = logits + row * ld;
  const int64_t c0 = int64_t(chunk) * kCols;
  const bool aligned = (reinterpret_cast<uintptr_t>(rowp) & 15) == 0;
  const bool whole = aligned && c0 + kCols <= V;

  int64_t tgt = -1;
  if (threadIdx.x == 0)
    tgt = (tgt64 ? static_cast<const int64_t*>(targets)[row * tgt_stride]
                 : int64_t(static_cast<const int32_t*>(targets)[row * tgt_stride])) -
          vocab_start;

  uint4 raw[kLpVecs];
  load_columns<T, kLpThreads, kLpVecs>(rowp, V, c0, aligned, raw);
  float t = -INFINITY;
  if (threadIdx.x == 0 && tgt >= c0 && tgt < c0 + kCols && tgt < V) t = to_float(rowp[tgt]);

  // Block max first (fixed butterfly, then the 8 warp maxima in order), so every thread
  // sums relative to the same m and the block reduction is two plain sums.
  __shared__ float warp_max[kLpThreads / 32];
  __shared__ float2 warp_sw[kLpThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float thread_max = raw_max<T>(raw);
  if constexpr (kMaxima) thread_maxima[int64_t(blockIdx.x) * kLpThreads + threadIdx.x] = thread_max;
  float m = thread_max;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (lane == 0) warp_max[warp] = m;
  __syncthreads();
  m = warp_max[0];
#pragma unroll
  for (int i = 1; i < kLpThreads / 32; ++i) m = fmaxf(m, warp_max[i]);

  float s = 0.f, w = 0.f;
  if (m != -INFINITY) {
    const float c = inv_temp * 1.4426950408889634f;  // scaled log2 units
    // the sums without a clamp an element where the chunk is whole; a chunk with padding
    // past V (-inf), or a thread whose sums come out nan (a -inf or nan logit made 0 *
    // -inf or nan), takes them with the clamp, which gives -inf and nan the weight 0 and
    // any other x the same bits. A whole chunk is loaded again for that (from L2, rarely)
    // so that the registers need not hold it through the first sums.
    bool clamp = !whole;
    if (!clamp) {
      chunk_sums<T, false>(raw, m, c, s, w);
      clamp = isnan(s + w);
      if (clamp) load_columns<T, kLpThreads, kLpVecs>(rowp, V, c0, aligned, raw);
    }
    if (clamp) chunk_sums<T, true>(raw, m, c, s, w);
  }
  const float2 sw = block_sum_pair<kLpThreads>(s, w, warp_sw);
  if (threadIdx.x == 0) state[blockIdx.x] = make_float4(m, sw.x, sw.y * 0.6931471805599453f, t);
}

// Merge n states per row, in order. state element (row, i) is at state[row * row_stride +
// i * item_stride], m and t in logit units times inv_temp (1 for shard partials, which are
// already scaled). Writes either the merged state (partials [T, 4], scaled) or the final
// log-prob (and entropy when ent != nullptr).
__global__ void merge_states_kernel(const float4* __restrict__ state, int64_t row_stride,
                                    int64_t item_stride, int n, int64_t T, float inv_temp,
                                    float4* __restrict__ merged, float* __restrict__ lp,
                                    float* __restrict__ ent) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= T) return;
  const float4* p = state + row * row_stride;
  float4 first = p[0];
  LpState acc{first.x, first.y, first.z};
  float t = first.w;
  for (int i = 1; i < n; ++i) {
    const float4 q = p[i * item_stride];
    acc = merge_state(acc, LpState{q.x, q.y, q.z}, inv_temp);
    t = fmaxf(t, q.w);
  }
  if (merged != nullptr) {
    merged[row] = make_float4(acc.m * inv_temp, acc.s, acc.w, t * inv_temp);
    return;
  }
  float out_lp = NAN, out_ent = NAN;
  if (acc.m != -INFINITY) {
    const float log_s = logf(acc.s);
    // t and m scaled and rounded before the difference (no fma contraction), exactly as a
    // shard's partial stores them, so one shard combined equals this op bit for bit
    out_lp = __fsub_rn(__fmul_rn(t, inv_temp), __fmul_rn(acc.m, inv_temp)) - log_s;
    out_ent = log_s - acc.w / acc.s;
  }
  lp[row] = out_lp;
  if (ent != nullptr) ent[row] = out_ent;
}

}  // namespace cuda
}  // namespace tokenspeed
