// The moe family's launch functions (moe.cu), on the plain-pointer boundary that
// launch.h describes: nothing here throws, each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {

// Shared memory the router needs for E experts (bytes per block).
int64_t moe_route_smem_bytes(int64_t E);

// logits [rows, E] of dtype (row stride ld) -> weights [rows, k] fp32, ids [rows, k]
// int32; forced [rows, k] int32 or null.
cudaError_t launch_moe_route(const void* logits, DType dtype, int64_t ld, int64_t rows,
                             int64_t E, int64_t k, bool renormalize, const int32_t* forced,
                             float* weights, int32_t* ids, cudaStream_t stream);

// ids [pairs] int32 (pairs = T * k) -> offsets [E + 1], sorted_tokens [pairs],
// pair_rows [pairs], all int32.
cudaError_t launch_moe_dispatch(const int32_t* ids, int64_t pairs, int64_t k, int64_t E,
                                int32_t* offsets, int32_t* sorted_tokens, int32_t* pair_rows,
                                cudaStream_t stream);

// y [tokens * k, H] of dtype (row stride ld_y) -> out [tokens, H].
cudaError_t launch_moe_combine(const void* y, DType dtype, int64_t ld_y,
                               const int32_t* pair_rows, const float* weights, int64_t tokens,
                               int64_t k, int64_t H, void* out, cudaStream_t stream);

// The grouped GEMM's tile table: int32 elements of the workspace it needs for E experts.
int64_t grouped_gemm_workspace(int64_t E);

// Rows offsets[e]:offsets[e + 1] of x [M, K] times weight[e]^T (weight [E, N, K]) -> out
// [M, N], all of dtype, contiguous, x and weight 16-byte aligned; offsets [E + 1] int32 or
// int64 (offsets_int64); workspace of grouped_gemm_workspace(E) int32 elements.
cudaError_t launch_grouped_gemm(const void* x, const void* weight, DType dtype,
                                const void* offsets, bool offsets_int64, int64_t M, int64_t N,
                                int64_t K, int64_t E, int32_t* workspace, void* out,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace tokenspeed
