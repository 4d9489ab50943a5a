/*
 * store_kv: scatter new K and V rows [N, Hk, D] into the paged caches [P, page, Hk, D].
 *
 * Fuses the K and V writes into one launch; reads each source element once and writes it
 * once, nothing else. Tiling: one thread per 16-byte vector of a token's Hk * D row
 * (scalar copies when the row is not a multiple of 16 bytes); a token whose slot is
 * negative is skipped.
 */
#pragma once

#include <cstdint>

namespace tokenspeed {
namespace cuda {

// k_cache, v_cache hold rows of `row_units` units of type unit_t; token t's row of k
// (v) starts at unit t * k_stride (t * v_stride); slots [N] int32 or int64.
template <typename unit_t, typename slot_t>
__global__ void store_kv_kernel(const unit_t* __restrict__ k, const unit_t* __restrict__ v,
                                unit_t* __restrict__ k_cache, unit_t* __restrict__ v_cache,
                                const slot_t* __restrict__ slots, int64_t n, int64_t row_units,
                                int64_t k_stride, int64_t v_stride) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * row_units) return;
  const int64_t token = idx / row_units, unit = idx - token * row_units;
  const int64_t slot = static_cast<int64_t>(slots[token]);
  if (slot < 0) return;
  k_cache[slot * row_units + unit] = k[token * k_stride + unit];
  v_cache[slot * row_units + unit] = v[token * v_stride + unit];
}

}  // namespace cuda
}  // namespace tokenspeed
