// Launcher of the fused head (head.cuh): the TMA descriptors of both operands, the grid,
// and the predicate of the calls the kernel serves.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>

#include "cuda/head.cuh"
#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {
namespace {

// cuTensorMapEncodeTiled from the driver the runtime found (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
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

// A [rows, cols] operand (row stride ld elements) read in boxes of box_rows x kHeadK,
// 128-byte swizzled as the wgmma descriptors expect; reads past the edges give zeros.
bool encode(CUtensorMap* map, const void* base, DType dtype, int64_t rows, int64_t cols,
            int64_t ld, int box_rows) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld) * 2};
  const cuuint32_t box[2] = {kHeadK, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode_tiled()(map,
                        dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                  : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                        2, const_cast<void*>(base), dims, strides, box, elem_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t launch(const CUtensorMap& map_a, const CUtensorMap& map_b, const HeadParams& p,
                   cudaStream_t stream) {
  auto* kernel = &head_partials_kernel<T>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kHeadSmemBytes);
  if (err != cudaSuccess) return err;
  int dev = 0, sms = 0;
  if ((err = cudaGetDevice(&dev)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
    return err;
  const int units = p.row_tiles * p.splits;  // < 2^31: checked by the caller
  kernel<<<std::min(units, sms), kHeadThreads, kHeadSmemBytes, stream>>>(map_a, map_b, p);
  return cudaGetLastError();
}

}  // namespace

int64_t head_partials_splits(int64_t V) {
  const int64_t tiles = (V + kHeadCols - 1) / kHeadCols;
  return (tiles + kHeadSplitTiles - 1) / kHeadSplitTiles;
}

bool head_partials_supports(DType dtype, int64_t h, const void* hidden, int64_t ld_hidden,
                            const void* weight, int64_t ld_weight) {
  if (dtype == DType::kFloat32 || h % 8 != 0 || ld_hidden % 8 != 0 || ld_weight % 8 != 0 ||
      !aligned16(hidden) || !aligned16(weight))
    return false;
#ifdef TOKENSPEED_SM90A
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0 && encode_tiled() != nullptr;
#else
  return false;
#endif
}

cudaError_t launch_head_partials(const void* hidden, int64_t ld_hidden, const void* weight,
                                 int64_t ld_weight, DType dtype, int64_t rows, int64_t V,
                                 int64_t H, const void* targets, bool targets_int64,
                                 int64_t targets_stride, int64_t vocab_start, float inv_temp,
                                 float* state, cudaStream_t stream) {
  CUtensorMap map_a, map_b;
  if (!encode(&map_a, hidden, dtype, rows, H, ld_hidden, kHeadRows) ||
      !encode(&map_b, weight, dtype, V, H, ld_weight, kHeadCols))
    return cudaErrorInvalidValue;
  HeadParams p;
  p.rows = rows;
  p.vocab = V;
  p.k_steps = static_cast<int>((H + kHeadK - 1) / kHeadK);
  p.row_tiles = static_cast<int>((rows + kHeadRows - 1) / kHeadRows);
  p.vocab_tiles = static_cast<int>((V + kHeadCols - 1) / kHeadCols);
  p.splits = static_cast<int>(head_partials_splits(V));
  p.targets = targets;
  p.targets_int64 = targets_int64;
  p.targets_stride = targets_stride;
  p.vocab_start = vocab_start;
  p.inv_temp = inv_temp;
  p.state = reinterpret_cast<float4*>(state);
  return dtype == DType::kBFloat16 ? launch<__nv_bfloat16>(map_a, map_b, p, stream)
                                   : launch<__half>(map_a, map_b, p, stream);
}

}  // namespace cuda
}  // namespace tokenspeed
