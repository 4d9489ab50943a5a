// Helpers shared by the host-compiled CUDA op files (*_host.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cuda/launch.h"
#include "op_checks.h"

namespace tokenspeed::cuda {

// Whether t's data starts on a 16-byte boundary (caching allocators return such storage;
// views with an offset may not).
inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TS_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

// The launch functions' dtype tag of a float tensor (checked to be fp32/bf16/fp16).
inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: return DType::kFloat32;
  }
}

}  // namespace tokenspeed::cuda
