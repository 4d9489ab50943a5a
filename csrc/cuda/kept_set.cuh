/*
 * filter_kept_set on CUDA: a warp a row, lane l holding candidates l and l + 32 in
 * registers (a thread a row would keep its 64-wide arrays in local memory).
 *
 * The decisions are kept_set.h's kept_set_steps; the sums over the candidates (WarpList)
 * round as the CPU's arrays and sampler_filters._kept_set_steps do: the same pairwise
 * halvings (the first, half = 32, inside a lane; the rest by shuffles from lane l + half)
 * and the same step-doubling prefix sums (the source of element i at step s is i - s,
 * fetched from the lane and slot that hold it), so each float addition has the operands
 * the Python steps give it.
 */
#pragma once

#include <cstdint>

#include "kept_set.h"

namespace tokenspeed {
namespace cuda {

__device__ __forceinline__ float shfl(float x, int lane) {
  return __shfl_sync(0xffffffffu, x, lane);
}

// row_sum of the kc candidates' a (both slots, zero where invalid), padded to width:
// the result on every lane
__device__ __forceinline__ float warp_row_sum(float a0, float a1, int width) {
  if (width == 64) a0 = a0 + a1;  // half = 32: element l plus element l + 32
  for (int half = width == 64 ? 16 : width / 2; half >= 1; half /= 2)
    a0 = a0 + __shfl_down_sync(0xffffffffu, a0, half);
  return shfl(a0, 0);
}

// A row's candidates in a warp's registers, lane l holding candidates l and l + 32 (the
// List of kept_set_steps). Every member is called by all 32 lanes.
struct WarpList {
  int lane, kc, width;  // width: kc rounded up to a power of two (row_sum's padding)
  bool valid0, valid1;
  float v0, v1, e0, ew0, e1, ew1;

  __device__ WarpList(const float* __restrict__ values, int kc_, float ref_m)
      : lane(threadIdx.x & 31), kc(kc_), width(1) {
    while (width < kc) width *= 2;
    valid0 = lane < kc;
    valid1 = lane + 32 < kc;
    v0 = valid0 ? values[lane] : -INFINITY;
    v1 = valid1 ? values[lane + 32] : -INFINITY;
    exp_of(v0, valid0, ref_m, e0, ew0);
    exp_of(v1, valid1, ref_m, e1, ew1);
  }

  __device__ static void exp_of(float v, bool valid, float ref_m, float& e, float& ew) {
    const float d = v - ref_m;
    e = !valid || v == -INFINITY ? 0.f : expf(d);
    ew = e > 0.f ? e * d : 0.f;
  }

  __device__ void mass(float tau, float& s, float& w) const {
    const float k0 = v0 >= tau ? 1.f : 0.f, k1 = v1 >= tau ? 1.f : 0.f;
    s = warp_row_sum(e0 * k0, e1 * k1, width);
    w = warp_row_sum(ew0 * k0, ew1 * k1, width);
  }

  // prefix sums of the top-k set's e, and each element's group start (the last index <= i
  // where the value changes), by step doubling
  __device__ void top_p(float tau_k, float bound, float& tau_p, bool& dropped) const {
    const float ek0 = e0 * (v0 >= tau_k ? 1.f : 0.f), ek1 = e1 * (v1 >= tau_k ? 1.f : 0.f);
    float c0 = ek0, c1 = ek1;
    // the value before each element: lane l - 1's (slot 1 of lane 0: slot 0 of lane 31)
    const float before0 = shfl(v0, (lane + 31) & 31), before1 = shfl(v1, (lane + 31) & 31);
    const float v0_last = shfl(v0, 31);
    int g0 = lane == 0 || v0 != before0 ? lane : 0;
    int g1 = v1 != (lane > 0 ? before1 : v0_last) ? lane + 32 : 0;
    for (int s = 1; s < 64; s *= 2) {
      if (s == 32) {
        if (s < kc) c1 = c1 + c0;
        g1 = max(g1, g0);
        continue;
      }
      // the lane holding element i - s: for slot 0, lane l - s; for slot 1, lane l - s's
      // slot 1, or below s, slot 0 of lane l + 32 - s
      const int src = (lane - s) & 31;
      const float t0 = shfl(c0, src), t1a = shfl(c1, src);
      const int h0 = __shfl_sync(0xffffffffu, g0, src), h1a = __shfl_sync(0xffffffffu, g1, src);
      if (s < kc) {
        const float t1 = lane >= s ? t1a : t0;
        if (lane >= s) c0 = c0 + t0;
        c1 = c1 + t1;
      }
      if (lane >= s) g0 = max(g0, h0);
      g1 = max(g1, lane >= s ? h1a : h0);
    }
    const float x0 = c0 - ek0, x1 = c1 - ek1;  // mass strictly before each element
    auto above_of = [&](int g) {
      const float a = shfl(x0, g & 31), b = shfl(x1, g & 31);
      return g >= 32 ? b : a;
    };
    const float above0 = above_of(g0), above1 = above_of(g1);
    const bool kept0 = valid0 && v0 >= tau_k, kept1 = valid1 && v1 >= tau_k;
    tau_p = INFINITY;
    if (kept0 && above0 < bound) tau_p = v0;
    if (kept1 && above1 < bound) tau_p = fminf(tau_p, v1);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) tau_p = fminf(tau_p, shfl(tau_p, lane ^ off));
    dropped = __any_sync(0xffffffffu, (kept0 && above0 >= bound) || (kept1 && above1 >= bound));
  }
};

// the row's candidates values [kc], ids [kc]; called by all 32 lanes of a warp
__device__ __forceinline__ KeptSet kept_set_warp(const float* __restrict__ values,
                                                 const int64_t* __restrict__ ids, int kc,
                                                 float ref_m, float big_s, float big_w,
                                                 int64_t top_k, float top_p, float min_p,
                                                 float pass_s, float pass_w) {
  return kept_set_steps(WarpList(values, kc, ref_m), values, ids, kc, ref_m, big_s, big_w,
                        top_k, top_p, min_p, pass_s, pass_w);
}

}  // namespace cuda
}  // namespace tokenspeed
