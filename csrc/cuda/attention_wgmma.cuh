/*
 * Paged causal GQA prefill attention for Hopper (sm_90a): warpgroup MMA (wgmma), warp
 * specialised, persistent. bf16/fp16, head dim 64 or 128.
 *
 * Fuses Q K^T, the causal mask, the online softmax (fp32 running max and sum) and P V in
 * one kernel. Never writes the scores or probabilities to memory: S and P live in
 * registers, Q and K/V tiles in shared memory, and only the normalised output is stored.
 *
 * Tiling: as the mma.sync kernel (attention_mma.cuh), work items of (kv head, request,
 * tile of 128 packed query rows), K/V tiles (here of 128 keys) read through the page
 * table, by TMA a page at a time where pages hold 64 keys or more, 64 keys at a time
 * where smaller pages lie consecutively in the cache, and by cp.async gathers otherwise
 * (zero-filled past the request), fully masked tiles never visited,
 * each item's KV range walked by one block alone and in order (a request's result does not
 * depend on the rest of the batch). Persistent: one block per SM claims items from the
 * dynamic tile scheduler (attention_wgmma_scheduler.cuh: a plan kernel numbers them first)
 * and walks their K/V tiles as one stream, so the next item's Q and first tiles load
 * while the current one computes.
 *
 * This file only sets up shared memory and dispatches the roles (attention_wgmma_mainloop.cuh):
 * warpgroup 0 produces (gathers Q and K/V tiles), warpgroups 1 and 2 consume (compute);
 * the producer gives up registers to them (setmaxnreg).
 */
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/attention_wgmma_mainloop.cuh"
#include "cuda/launch.h"
#include "cuda/pipeline.cuh"
#include "cuda/wgmma.cuh"

namespace tokenspeed {
namespace cuda {

// One block per SM (at most hk x tiles x batch of them), kSm90Threads each; the plan
// written by sm90_plan_kernel just before.
template <typename T, int D>
__global__ void __launch_bounds__(kSm90Threads, 1) paged_attention_wgmma_kernel(
    const PagedAttnParams p, const __grid_constant__ CUtensorMap k_map,
    const __grid_constant__ CUtensorMap v_map, const Sm90Plan plan, const int batch) {
  static_assert(D == 64 || D == 128, "a tile row is one or two 64-column panels");
#ifdef TS_SM90A_DEVICE
  extern __shared__ unsigned char smem_raw[];
  // 128-byte swizzle atoms start on 1024-byte boundaries
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  T* sQ = reinterpret_cast<T*>(smem_raw + ((1024u - (smem_base & 1023u)) & 1023u));
  T* sK = sQ + kSm90QSlots * kSm90Rows * D;
  T* sV = sK + kSm90KSlots * kSm90Keys * D;
  __shared__ Sm90Item items[kSm90ItemSlots];
  __shared__ __align__(8) uint64_t q_full[kSm90QSlots], q_empty[kSm90QSlots];
  __shared__ __align__(8) uint64_t kv_full[kSm90VSlots], k_empty[kSm90KSlots],
      v_empty[kSm90VSlots];
  __shared__ volatile float softmax_done[kSm90ConsumerThreads];
  const Sm90Smem<T> sm{sQ, sK, sV, items, q_full, q_empty, kv_full, k_empty, v_empty,
                       softmax_done};

  const int tid = threadIdx.x;
  if (tid == 0) sm.init_barriers();
  __syncthreads();

  if (tid < kSm90Producers) {
    pipe::setmaxnreg_dec<kSm90ProducerRegs>();
    sm90_producer<T, D>(p, &k_map, &v_map, plan, batch, sm, tid);
    return;
  }
  pipe::setmaxnreg_inc<kSm90ConsumerRegs>();
  // the lane taken here, past setmaxnreg: taken before it, ptxas kept it in local memory
  sm90_consumer<T, D>(p, sm, tid, tid % 32);
#endif  // TS_SM90A_DEVICE
}

}  // namespace cuda
}  // namespace tokenspeed
