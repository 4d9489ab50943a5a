/*
 * Fused log-prob gather: log_softmax(logits / temperature)[t, target[t]] and the row
 * entropy in one streaming pass over each logits row.
 *
 * Fuses: temperature scaling (a multiply in registers, applied to differences from the max), max, sum of exp, the entropy
 * moment and the target gather. Never writes [T, V] (nor any exp/log-softmax tensor); the
 * only intermediate in memory is a [T, C, 4] fp32 state (C = ceil(V / kChunk)).
 *
 * Tiling: grid (T, C); block (t, c) reduces columns [c * kChunk, (c + 1) * kChunk)
 * with 256 threads, each holding kChunk / 256 elements loaded as 16-byte vectors
 * (all loads issued before the first use). Per chunk the state is
 *   m = max x,  s = sum e^(x - m),  w = sum e^(x - m) (x - m),  t = x[target] or -inf
 * (m and t held in logit units until the end, x - m formed before scaling),
 * reduced across the block by a fixed butterfly. A second kernel merges a row's C states
 * in chunk order (the same merge serves vocabulary shards). The chunking and every
 * reduction order are fixed in column space, so a row's result depends neither on T nor
 * on the other rows, nor on whether its row start happens to be 16-byte aligned (an
 * unaligned row loads the same elements into the same threads with scalar loads).
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace tokenspeed {
namespace cuda {

constexpr int kLpThreads = 256;
constexpr int kChunk = 8192;  // columns per block: 32 per thread

struct LpState {
  float m, s, w;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Merge b into a; both m finite or -inf (s = w = 0 then). m is kept in logit units (before
// the temperature) and w relative to m in scaled units, so the shift between two maxima
// is an exact fp32 difference scaled once: large logits lose no precision.
__device__ __forceinline__ LpState merge_state(LpState a, LpState b, float inv_temp) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;
  const float da = (a.m - m) * inv_temp, db = (b.m - m) * inv_temp;
  const float ea = a.m == -INFINITY ? 0.f : expf(da);
  const float eb = b.m == -INFINITY ? 0.f : expf(db);
  const float wa = a.m == -INFINITY ? 0.f : (a.w + a.s * da) * ea;
  const float wb = b.m == -INFINITY ? 0.f : (b.w + b.s * db) * eb;
  return {m, a.s * ea + b.s * eb, wa + wb};
}

// One block per (chunk, row). logits [T, V] (row stride ld elements), targets [T] relative
// to this tensor's column 0 (already shifted by vocab_start), state out [T, C, 4].
template <typename scalar_t>
__global__ void __launch_bounds__(kLpThreads)
    logprob_chunk_kernel(const scalar_t* __restrict__ logits, int64_t ld, int64_t V,
                         const int64_t* __restrict__ targets, int64_t vocab_start,
                         float inv_temp, float4* __restrict__ state, int num_chunks) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kPerThread = kChunk / (kLpThreads * kVec);  // vectors per thread
  const int64_t row = blockIdx.x;
  const int chunk = blockIdx.y;
  const scalar_t* rowp = logits + row * ld;
  const int64_t c0 = int64_t(chunk) * kChunk;
  const bool aligned = (reinterpret_cast<uintptr_t>(rowp) & 15) == 0;

  float x[kPerThread][kVec];
  // element e of vector j of thread i sits at column c0 + (j * 256 + i) * kVec + e
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t col = c0 + (int64_t(j) * kLpThreads + threadIdx.x) * kVec;
    if (aligned && col + kVec <= V) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(rowp + col));
      const scalar_t* v = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
      for (int e = 0; e < kVec; ++e) x[j][e] = to_float(v[e]);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        x[j][e] = col + e < V ? to_float(rowp[col + e]) : -INFINITY;
    }
  }
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j)
#pragma unroll
    for (int e = 0; e < kVec; ++e) m = fmaxf(m, x[j][e]);
  float s = 0.f, w = 0.f;
  if (m != -INFINITY) {
    constexpr float kLog2e = 1.4426950408889634f;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        // -inf logits: d = -inf -> e = 0; clamp d so that 0 * d stays 0
        const float d = fmaxf((x[j][e] - m) * inv_temp, -1e30f);
        const float p = exp2f(d * kLog2e);
        s += p;
        w = fmaf(p, d, w);
      }
  }
  LpState st{m, s, w};
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LpState o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
              __shfl_xor_sync(0xffffffffu, st.w, off)};
    st = (threadIdx.x & off) ? merge_state(o, st, inv_temp) : merge_state(st, o, inv_temp);
  }
  __shared__ LpState warp_state[kLpThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_state[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    LpState acc = warp_state[0];
#pragma unroll
    for (int i = 1; i < kLpThreads / 32; ++i) acc = merge_state(acc, warp_state[i], inv_temp);
    const int64_t tgt = targets[row] - vocab_start;
    float t = -INFINITY;
    if (tgt >= c0 && tgt < c0 + kChunk && tgt < V) t = to_float(rowp[tgt]);
    state[row * num_chunks + chunk] = make_float4(acc.m, acc.s, acc.w, t);
  }
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
    out_lp = (t - acc.m) * inv_temp - log_s;
    out_ent = log_s - acc.w / acc.s;
  }
  lp[row] = out_lp;
  if (ent != nullptr) ent[row] = out_ent;
}

}  // namespace cuda
}  // namespace tokenspeed
