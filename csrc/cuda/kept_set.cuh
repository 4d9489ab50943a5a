/*
 * filter_kept_set on CUDA: a warp a row, lane l holding candidates l and l + 32 in
 * registers (a thread a row kept its arrays in local memory and took milliseconds).
 *
 * The steps and every rounding are those of kept_set.h (the CPU op) and of
 * sampler_filters._kept_set_steps: the sums over the candidates are the same pairwise
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

// the row's candidates values [kc], ids [kc]; called by all 32 lanes of a warp
__device__ __forceinline__ KeptSet kept_set_warp(const float* __restrict__ values,
                                                 const int64_t* __restrict__ ids, int kc,
                                                 float ref_m, float big_s, float big_w,
                                                 int64_t top_k, float top_p, float min_p) {
  const int lane = threadIdx.x & 31;
  const float neg = -INFINITY;
  const bool valid0 = lane < kc, valid1 = lane + 32 < kc;
  const float v0 = valid0 ? values[lane] : neg, v1 = valid1 ? values[lane + 32] : neg;
  auto exp_of = [&](float v, bool valid, float& e, float& ew) {
    const float d = v - ref_m;
    e = !valid || v == neg ? 0.f : expf(d);
    ew = e > 0.f ? e * d : 0.f;
  };
  float e0, ew0, e1, ew1;
  exp_of(v0, valid0, e0, ew0);
  exp_of(v1, valid1, e1, ew1);
  const float last = values[kc - 1];
  const bool complete = ids[kc - 1] < 0;
  auto inside_list = [&](float tau) { return complete || last < tau; };
  int width = 1;
  while (width < kc) width *= 2;
  auto list_mass = [&](float tau, float& s, float& w) {
    const float k0 = v0 >= tau ? 1.f : 0.f, k1 = v1 >= tau ? 1.f : 0.f;
    s = warp_row_sum(e0 * k0, e1 * k1, width);
    w = warp_row_sum(ew0 * k0, ew1 * k1, width);
  };

  const bool has_k = top_k > 0, has_p = top_p < 1.f;
  const float tau_m = min_p > 0.f ? ref_m + logf(min_p) : neg;
  int kth = static_cast<int>(top_k - 1);
  kth = kth < 0 ? 0 : (kth > kc - 1 ? kc - 1 : kth);
  const float tau_k = has_k ? values[kth] : neg;
  float s_k = big_s, w_k = big_w;
  if (has_k) list_mass(tau_k, s_k, w_k);
  const bool short_k = has_k && !inside_list(tau_k) && (has_p || tau_m <= tau_k);

  // prefix sums of the top-k set's e, and each element's group start (the last index <= i
  // where the value changes), by step doubling
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
  const float bound = top_p * s_k;
  const bool kept0 = valid0 && v0 >= tau_k, kept1 = valid1 && v1 >= tau_k;
  float tau_p = INFINITY;
  if (kept0 && above0 < bound) tau_p = v0;
  if (kept1 && above1 < bound) tau_p = fminf(tau_p, v1);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) tau_p = fminf(tau_p, shfl(tau_p, lane ^ off));
  const bool dropped = __any_sync(0xffffffffu, (kept0 && above0 >= bound) ||
                                                    (kept1 && above1 >= bound));
  const bool known_p = has_k || dropped || complete;
  if (!has_p) tau_p = neg;
  const bool search = has_p && !known_p;

  const float tau = kept_set_detail::max_of(kept_set_detail::max_of(tau_k, tau_p), tau_m);
  float s_kept, w_kept;
  list_mass(tau, s_kept, w_kept);
  const bool open_set = tau == neg;
  if (open_set) {
    s_kept = big_s;
    w_kept = big_w;
  }
  const bool at_k = has_k && tau == tau_k && !open_set;
  if (at_k) {
    s_kept = s_k;
    w_kept = w_k;
  }
  const bool need = !open_set && !at_k && !inside_list(tau);
  return {tau, s_kept, w_kept, short_k || search || need};
}

}  // namespace cuda
}  // namespace tokenspeed
