// Small fp32 helpers shared by the CPU kernels: an explicit 8-lane vector type and a
// branch-free exp for the hot loops (no libm calls there), and dtype conversions.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace tokenspeed::cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 8 fp32 lanes as a GCC/Clang vector type: the compiler emits SSE pairs, or AVX in a
// function built for it, and the selects below stay branch-free (plain loops with float
// selects are not if-converted under the default -ftrapping-math, so they stay scalar).
// The helpers are always inlined: an out-of-line copy would be shared between a caller
// built for AVX2 and one built without it, which pass 32-byte vectors differently (the
// -Wpsabi note, silenced because it cannot apply).
#define TOKENSPEED_VEC_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
constexpr int64_t kLanes = 8;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

TOKENSPEED_VEC_INLINE vfloat vsplat(float x) { return vfloat{} + x; }
TOKENSPEED_VEC_INLINE vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
TOKENSPEED_VEC_INLINE vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
TOKENSPEED_VEC_INLINE float hmax(vfloat v) {
  float m = v[0];
  for (int64_t i = 1; i < kLanes; ++i) m = m > v[i] ? m : v[i];
  return m;
}
TOKENSPEED_VEC_INLINE float hsum(vfloat v) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

constexpr float kExpFloor = -87.3f;  // below it expf leaves the normal range

// max(d, kExpFloor): -inf (and nan) become the finite floor, so 0 * clamped is never nan.
TOKENSPEED_VEC_INLINE vfloat clamp_exp_arg(vfloat d) {
  return d > vsplat(kExpFloor) ? d : vsplat(kExpFloor);
}

// exp(x) for kExpFloor <= x <= 0 (a clamp_exp_arg result) within ~2 ulp of expf, and
// exactly 0 at the floor. Cephes' expf: round x/ln2 to n with the 1.5 * 2^23 trick,
// reduce with a two-part ln2, a degree-6 polynomial, scale by 2^n via the exponent bits.
TOKENSPEED_VEC_INLINE vfloat exp_clamped(vfloat x) {
  const vfloat magic = vsplat(12582912.0f);
  const vfloat fn = (x * 1.44269504088896341f + magic) - magic;
  const vfloat r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  vfloat p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vfloat y = p * r * r + r + 1.0f;
  const vint bits = (__builtin_convertvector(fn, vint) + 127) << 23;
  vfloat two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x > vsplat(kExpFloor) ? y * two_n : vfloat{};
}
#pragma GCC diagnostic pop

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

}  // namespace tokenspeed::cpu
