// Launchers of the sm_90a GEMM kernel with fused epilogues (gemm_sm90.cuh), of which the
// fused LM head (head.cuh) is the one: the TMA descriptors of both operands, the grid, and
// the predicate of the calls it serves.
#include <algorithm>

#include "cuda/head.cuh"
#include "cuda/launch.h"
#include "cuda/tma_map.h"

namespace tokenspeed {
namespace cuda {
namespace {

// A [rows, cols] operand (row stride ld elements) read in boxes of box_rows x kGemmK.
bool encode(CUtensorMap* map, const void* base, DType dtype, int64_t rows, int64_t cols,
            int64_t ld, int box_rows) {
  const uint64_t dims[2] = {static_cast<uint64_t>(cols), static_cast<uint64_t>(rows)};
  const uint64_t strides[1] = {static_cast<uint64_t>(ld) * 2};
  const uint32_t box[2] = {kGemmK, static_cast<uint32_t>(box_rows)};
  return tma_encode_16bit(map, base, dtype, 2, dims, strides, box);
}

int k_steps(int64_t k) { return static_cast<int>((k + kGemmK - 1) / kGemmK); }

// a [rows, k] and b [b_rows, k], both with unit stride along k, into their descriptors,
// then the kernel of epilogue E (the caller has checked gemm_sm90_supports).
template <typename T, typename E>
cudaError_t launch(const void* a, int64_t lda, int64_t rows, const void* b, int64_t ldb,
                   int64_t b_rows, int64_t k, DType dtype, const typename E::Params& p,
                   cudaStream_t stream) {
  CUtensorMap map_a, map_b;
  if (!encode(&map_a, a, dtype, rows, k, lda, kGemmRows) ||
      !encode(&map_b, b, dtype, b_rows, k, ldb, kGemmBox))
    return cudaErrorInvalidValue;
  auto* kernel = &gemm_sm90_kernel<T, E>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kGemmSmemBytes);
  if (err != cudaSuccess) return err;
  int dev = 0, sms = 0;
  if ((err = cudaGetDevice(&dev)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
    return err;
  kernel<<<std::min(p.units, sms), kGemmThreads, kGemmSmemBytes, stream>>>(map_a, map_b, p);
  return cudaGetLastError();
}

}  // namespace

bool gemm_sm90_supports(DType dtype, int64_t k, const void* a, int64_t lda, const void* b,
                        int64_t ldb) {
  if (dtype == DType::kFloat32 || k % 8 != 0 || lda % 8 != 0 || ldb % 8 != 0 ||
      !tma_aligned16(a) || !tma_aligned16(b))
    return false;
  return wgmma::available() && tma_encode_tiled() != nullptr;
}

int64_t gemm_sm90_row_tiles(int64_t rows) { return (rows + kGemmRows - 1) / kGemmRows; }

int64_t head_partials_splits(int64_t V) {
  const int64_t tiles = (V + kGemmCols - 1) / kGemmCols;
  return (tiles + kHeadSplitTiles - 1) / kHeadSplitTiles;
}

cudaError_t launch_head_partials(const void* hidden, int64_t ld_hidden, const void* weight,
                                 int64_t ld_weight, DType dtype, int64_t rows, int64_t V,
                                 int64_t H, const void* targets, bool targets_int64,
                                 int64_t targets_stride, int64_t vocab_start, float inv_temp,
                                 float* state, cudaStream_t stream) {
  HeadEpilogue::Params p;
  p.k_steps = k_steps(H);
  p.rows = rows;
  p.vocab = V;
  p.row_tiles = static_cast<int>(gemm_sm90_row_tiles(rows));
  p.vocab_tiles = static_cast<int>((V + kGemmCols - 1) / kGemmCols);
  p.splits = static_cast<int>(head_partials_splits(V));
  p.units = p.row_tiles * p.splits;
  p.targets = targets;
  p.targets_int64 = targets_int64;
  p.targets_stride = targets_stride;
  p.vocab_start = vocab_start;
  p.inv_temp = inv_temp;
  p.state = reinterpret_cast<float4*>(state);
  return dtype == DType::kBFloat16
             ? launch<__nv_bfloat16, HeadEpilogue>(hidden, ld_hidden, rows, weight, ld_weight, V,
                                                   H, dtype, p, stream)
             : launch<__half, HeadEpilogue>(hidden, ld_hidden, rows, weight, ld_weight, V, H,
                                            dtype, p, stream);
}

}  // namespace cuda
}  // namespace tokenspeed
