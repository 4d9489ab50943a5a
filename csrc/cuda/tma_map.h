// Host side of the TMA (tensor memory accelerator) loads: tensor maps of 16-bit tensors,
// 128-byte swizzled as the wgmma descriptors expect, encoded through the driver the
// runtime found (no link against libcuda). For the .cu launchers (nvcc), which pass the
// maps to their kernels as __grid_constant__ parameters.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {

// cuTensorMapEncodeTiled, or nullptr where the driver lacks it.
inline PFN_cuTensorMapEncodeTiled_v12000 tma_encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // a missing entry point is an answer, not a pending error
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A map over a rank-`rank` tensor of `dtype` (bf16 or fp16) at `base`: dims innermost
// first, byte_strides of dims 1.. (multiples of 16), boxes of `box` elements, the inner
// box dim 64 (one 128-byte swizzle row). Reads past the dims give zeros. False when the
// driver refuses (or lacks the entry point).
inline bool tma_encode_16bit(CUtensorMap* map, const void* base, DType dtype, int rank,
                             const uint64_t* dims, const uint64_t* byte_strides,
                             const uint32_t* box) {
  const auto encode = tma_encode_tiled();
  if (encode == nullptr || rank < 1 || rank > 5) return false;
  cuuint64_t d[5], s[4];
  cuuint32_t b[5], e[5];
  for (int i = 0; i < rank; ++i) {
    d[i] = dims[i];
    b[i] = box[i];
    e[i] = 1;
    if (i > 0) s[i - 1] = byte_strides[i - 1];
  }
  return encode(map,
                dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                          : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                static_cast<cuuint32_t>(rank), const_cast<void*>(base), d, s, b, e,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

inline bool tma_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace cuda
}  // namespace tokenspeed
