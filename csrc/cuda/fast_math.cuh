/*
 * Fast math shared by the kernels that accept its error, spelled once so they all issue
 * the same instruction.
 */
#pragma once

namespace tokenspeed {
namespace cuda {

// 2^x in one MUFU.EX2; results below 2^-126 flush to zero. Its callers exponentiate
// relative to a max, so the sums they feed hold a term 1 and cannot tell such a result
// from zero; exp2f would spend three more instructions per call on them (a third of the
// attention softmax's work).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace cuda
}  // namespace tokenspeed
