/*
 * The launchers' dtype dispatch: calls f(T{}) with the device element type of a DType.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {

template <typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
    default: f(float{}); break;
  }
}

}  // namespace cuda
}  // namespace tokenspeed
