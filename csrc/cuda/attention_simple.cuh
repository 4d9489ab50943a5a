/*
 * Paged causal GQA prefill attention, the fallback for what the tiled kernels do not
 * serve: fp32, and head dims other than 64 and 128 (up to 32 * kMaxDimPerLane).
 *
 * Fuses q . k, the causal mask, the online softmax (fp32 running max and sum, exp2f) and
 * the weighted sum of V. Never writes scores or probabilities to memory; nothing goes
 * through shared memory either.
 *
 * Tiling: one warp per (token, query head); lane i holds dims i, i + 32, ... of q and of
 * the output; the keys are walked one at a time, each dot product reduced over the warp
 * with shuffles.
 */
#pragma once

#include <cstdint>

#include "cuda/attention_tile.cuh"
#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {

// req_of [n_tokens] int32: each token's request.
template <typename T, int kMaxDimPerLane>
__global__ void paged_attention_simple_kernel(const PagedAttnParams p, const int32_t* req_of,
                                              int64_t n_tokens) {
  const int64_t warp_id = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp_id >= n_tokens * p.hq) return;
  const int64_t token = warp_id / p.hq;
  const int head = warp_id % p.hq, kvh = head / p.group, D = p.head_dim;
  const int b = req_of[token];
  const int q_begin = p.cu_seqlens[b], n_new = p.cu_seqlens[b + 1] - q_begin;
  const int qpos = p.kv_lens[b] - n_new + int(token - q_begin);
  const int32_t* pages = p.page_table + int64_t(b) * p.pt_stride;
  const T* q = static_cast<const T*>(p.q) + token * p.q_stride + int64_t(head) * D;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  float qr[kMaxDimPerLane], acc[kMaxDimPerLane];
#pragma unroll
  for (int i = 0; i < kMaxDimPerLane; ++i) {
    const int d = lane + 32 * i;
    qr[i] = d < D ? float(q[d]) : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int key = 0; key <= qpos; ++key) {
    const int64_t base = (page_slot(p, pages[page_entry(p, key)], key) * p.hk + kvh) * D;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxDimPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) dot = fmaf(qr[i], float(kc[base + d]), dot);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float x = dot * p.scale_log2;
    const float mn = fmaxf(m, x);
    const float alpha = exp2f(m - mn), e = exp2f(x - mn);
    l = l * alpha + e;
    m = mn;
#pragma unroll
    for (int i = 0; i < kMaxDimPerLane; ++i) {
      const int d = lane + 32 * i;
      acc[i] = acc[i] * alpha + (d < D ? e * float(vc[base + d]) : 0.f);
    }
  }
  T* out = static_cast<T*>(p.out) + (token * p.hq + head) * D;
#pragma unroll
  for (int i = 0; i < kMaxDimPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < D) out[d] = T(acc[i] / l);
  }
}

}  // namespace cuda
}  // namespace tokenspeed
