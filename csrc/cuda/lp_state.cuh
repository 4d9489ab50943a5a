// The (m, s, w) state of a run of logits and its ordered merge, shared by the log-prob
// kernels (logprobs.cuh) and the fused head (head.cuh).
#pragma once

#include <cmath>

namespace tokenspeed {
namespace cuda {

struct LpState {
  float m, s, w;
};

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

}  // namespace cuda
}  // namespace tokenspeed
