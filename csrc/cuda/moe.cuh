/*
 * moe: the router, the dispatch and the combine of a mixture-of-experts layer.
 *
 * route_kernel fuses the fp32 softmax over E experts, the top-k selection and the
 * renormalisation; the [T, E] probabilities never reach global memory. Tiling: one warp
 * per token; the warp's row of E probabilities lives in shared memory (E * 4 bytes per
 * warp), lane i owns experts i, i + 32, ...; each of the k rounds is one pass over the
 * lane's experts and a warp argmax in which ties go to the lower expert id, after which
 * the winner's probability is marked taken (-0.5, below every probability). A forced row
 * (routing replay) skips the selection and reads its experts' probabilities.
 *
 * Dispatch is a stable counting sort of the T * k (token, slot) pairs by expert, in three
 * launches: count (per-block shared histograms added with integer atomics, so the counts
 * are exact), an exclusive scan of the E counts (one thread; E <= 2048), and place (one
 * block per expert walking all pairs in order in runs of 16 per thread; a block-wide scan
 * of the runs' match counts gives each pair its rank), so rows never depend on thread
 * timing. Nothing but the three outputs is written.
 *
 * combine_kernel: one block per token, threads over H; the token's k expert rows are
 * read through pair_rows and summed in fp32 in slot order, then rounded once.
 */
#pragma once

#include <cstdint>

#include "cuda/dtype.cuh"

namespace tokenspeed {
namespace cuda {
namespace moe {

constexpr int kRouteWarps = 4;    // tokens per router block
constexpr int kCountThreads = 256;
constexpr int kCountRun = 16;     // pairs per thread of the count kernel
constexpr int kPlaceThreads = 256;
constexpr int kPlaceRun = 16;     // consecutive pairs per thread and pass of place
constexpr float kTaken = -0.5f;   // a probability already chosen this row

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// logits [rows, E] (row stride ld, unit column stride); forced [rows, k] int32 or null;
// weights [rows, k] fp32, ids [rows, k] int32. Dynamic shared memory: kRouteWarps * E
// floats.
template <typename T>
__global__ void route_kernel(const T* __restrict__ logits, int64_t ld, int64_t rows, int E,
                             int k, bool renormalize, const int32_t* __restrict__ forced,
                             float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ float probs_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kRouteWarps + warp;
  if (row >= rows) return;  // a whole warp leaves; the block never synchronises
  float* p = probs_smem + warp * E;
  const T* x = logits + row * ld;
  float m = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    const float v = to_float(x[e]);
    p[e] = v;
    m = fmaxf(m, v);
  }
  m = warp_max(m);
  float sum = 0.f;
  for (int e = lane; e < E; e += 32) {
    const float v = expf(p[e] - m);
    p[e] = v;
    sum += v;
  }
  sum = warp_sum(sum);
  for (int e = lane; e < E; e += 32) p[e] = p[e] / sum;
  __syncwarp();
  const bool replay = forced != nullptr && forced[row * k] >= 0;
  float total = 0.f;
  for (int s = 0; s < k; ++s) {
    int best;
    float best_p;
    if (replay) {
      best = forced[row * k + s];
      best_p = p[best];
    } else {
      best = E;  // no candidate yet; experts are scanned in increasing id order
      best_p = -1.f;
      for (int e = lane; e < E; e += 32) {
        const float v = p[e];
        if (v > best_p) best_p = v, best = e;
      }
      for (int off = 16; off > 0; off >>= 1) {
        const float other_p = __shfl_xor_sync(0xffffffffu, best_p, off);
        const int other = __shfl_xor_sync(0xffffffffu, best, off);
        if (other_p > best_p || (other_p == best_p && other < best)) best_p = other_p, best = other;
      }
      if (best == E) best = 0, best_p = p[0];  // every probability NaN: as the CPU kernel
      __syncwarp();
      if (lane == 0) p[best] = kTaken;
      __syncwarp();
    }
    if (lane == 0) {
      ids[row * k + s] = best;
      weights[row * k + s] = best_p;
    }
    total += best_p;
  }
  if (renormalize && lane == 0)
    for (int s = 0; s < k; ++s) weights[row * k + s] /= total;
}

// counts [E + 1] zeroed; counts[e + 1] += pairs routed to e. Each block counts its
// kCountThreads * kCountRun pairs into a shared histogram (dynamic shared memory: E ints),
// then adds its non-zero counts to global memory: few global atomics per expert.
__global__ void count_kernel(const int32_t* __restrict__ ids, int64_t pairs, int E,
                             int32_t* __restrict__ counts) {
  extern __shared__ int hist_smem[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist_smem[e] = 0;
  __syncthreads();
  const int64_t base = int64_t(blockIdx.x) * kCountThreads * kCountRun;
  for (int r = 0; r < kCountRun; ++r) {
    const int64_t j = base + int64_t(r) * kCountThreads + threadIdx.x;  // coalesced
    if (j < pairs) atomicAdd(&hist_smem[ids[j]], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (hist_smem[e] != 0) atomicAdd(&counts[e + 1], hist_smem[e]);
}

// In place: offsets[e + 1] = sum of counts up to e (offsets[0] stays 0).
__global__ void scan_kernel(int32_t* __restrict__ offsets, int E) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  for (int e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
}

// Block e writes, in pair order, the grouped rows offsets[e] ... of its pairs. Per pass
// of kPlaceThreads * kPlaceRun pairs, thread t owns the run [t * kPlaceRun, (t + 1) *
// kPlaceRun): it counts its matches, an exclusive scan over the threads (in thread order,
// hence pair order) gives its first row, and it writes its matches in order.
__global__ void place_kernel(const int32_t* __restrict__ ids, int64_t pairs, int k,
                             const int32_t* __restrict__ offsets,
                             int32_t* __restrict__ sorted_tokens, int32_t* __restrict__ pair_rows) {
  __shared__ int warp_totals[kPlaceThreads / 32];
  const int expert = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int64_t kPass = int64_t(kPlaceThreads) * kPlaceRun;
  int64_t next = offsets[expert];
  for (int64_t base = 0; base < pairs; base += kPass) {
    const int64_t first = base + int64_t(threadIdx.x) * kPlaceRun;
    int count = 0;
    for (int r = 0; r < kPlaceRun; ++r) {
      const int64_t j = first + r;
      count += (j < pairs && ids[j] == expert) ? 1 : 0;
    }
    int inclusive = count;  // scan over the warp's lanes
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, inclusive, off);
      if (lane >= off) inclusive += v;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    int before = inclusive - count, pass_total = 0;
    for (int w = 0; w < kPlaceThreads / 32; ++w) {
      before += w < warp ? warp_totals[w] : 0;
      pass_total += warp_totals[w];
    }
    int64_t row = next + before;
    for (int r = 0; r < kPlaceRun; ++r) {
      const int64_t j = first + r;
      if (j < pairs && ids[j] == expert) {
        sorted_tokens[row] = static_cast<int32_t>(j / k);
        pair_rows[j] = static_cast<int32_t>(row);
        ++row;
      }
    }
    next += pass_total;
    __syncthreads();  // warp_totals is rewritten by the next pass
  }
}

// out [T, H] (row stride H) = sum_s weights[t, s] * y[pair_rows[t * k + s]] (y's row
// stride ld_y), fp32 accumulation in slot order.
template <typename T>
__global__ void combine_kernel(const T* __restrict__ y, int64_t ld_y,
                               const int32_t* __restrict__ pair_rows,
                               const float* __restrict__ weights, int k, int64_t H,
                               T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < k; ++s)
      acc += weights[t * k + s] * to_float(y[int64_t(pair_rows[t * k + s]) * ld_y + h]);
    out[t * H + h] = round_to<T>(acc);
  }
}

}  // namespace moe
}  // namespace cuda
}  // namespace tokenspeed
