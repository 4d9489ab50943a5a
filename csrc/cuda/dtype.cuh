/*
 * Element conversions shared by the kernels: T -> fp32, and fp32 -> T with
 * round-to-nearest-even (as torch's casts do), for T in float, bf16, fp16.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tokenspeed {
namespace cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T round_to(float x);
template <>
__device__ __forceinline__ float round_to<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 round_to<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half round_to<__half>(float x) { return __float2half_rn(x); }

}  // namespace cuda
}  // namespace tokenspeed
