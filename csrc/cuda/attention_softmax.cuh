/*
 * The online softmax of the tiled attention kernels (mma.sync and wgmma), on S tiles in
 * registers in the mma.m16n8 accumulator layout: each thread holds parts of two rows
 * (lane / 4 and lane / 4 + 8 of its warp's 16); s[i] holds keys 8i + 2 * (lane % 4) +
 * {0,1}, entries 0-1 of the low row, 2-3 of the high row. Running max and sum in fp32,
 * in log2 units (scores scaled by softmax scale * log2(e)).
 */
#pragma once

#include <cstdint>

#include "cuda/fast_math.cuh"
#include "cuda/ptx_sm80.cuh"

namespace tokenspeed {
namespace cuda {

// Running max and sum of this thread's two rows.
struct RowSoftmax {
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

  // Masks keys past each row's position (only on tiles that cross the diagonal), folds
  // the tile into the running max and sum, overwrites s with exp2(s * scale_log2 - m)
  // and returns in alpha_* the factors by which O must be rescaled.
  template <int N>
  __device__ __forceinline__ void tile(float (&s)[N][4], int key0, int min_qpos, int qpos_lo,
                                       int qpos_hi, int lane, float scale_log2,
                                       float& alpha_lo, float& alpha_hi) {
    if (key0 + N * 8 - 1 > min_qpos) {
#pragma unroll
      for (int nt = 0; nt < N; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = key0 + nt * 8 + (lane % 4) * 2 + e;
          if (key > qpos_lo) s[nt][e] = -INFINITY;
          if (key > qpos_hi) s[nt][2 + e] = -INFINITY;
        }
    }
    // Four independent chains per row for the max and the sum: with two warps per
    // scheduler, one long dependent chain leaves it idle.
    static_assert(N % 4 == 0, "four chains");
    float mxs[2][4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      mxs[0][c] = fmaxf(s[c][0], s[c][1]);
      mxs[1][c] = fmaxf(s[c][2], s[c][3]);
    }
#pragma unroll
    for (int nt = 4; nt < N; ++nt) {
      mxs[0][nt % 4] = fmaxf(mxs[0][nt % 4], fmaxf(s[nt][0], s[nt][1]));
      mxs[1][nt % 4] = fmaxf(mxs[1][nt % 4], fmaxf(s[nt][2], s[nt][3]));
    }
    float mx_lo = fmaxf(fmaxf(mxs[0][0], mxs[0][1]), fmaxf(mxs[0][2], mxs[0][3]));
    float mx_hi = fmaxf(fmaxf(mxs[1][0], mxs[1][1]), fmaxf(mxs[1][2], mxs[1][3]));
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    // Tile 0 holds key 0 <= every row's position, so m is finite from the first tile on.
    const float mn_lo = fmaxf(m_lo, mx_lo * scale_log2);
    const float mn_hi = fmaxf(m_hi, mx_hi * scale_log2);
    alpha_lo = exp2_ftz(m_lo - mn_lo);
    alpha_hi = exp2_ftz(m_hi - mn_hi);
    m_lo = mn_lo;
    m_hi = mn_hi;
    float sums[2][4] = {};
#pragma unroll
    for (int nt = 0; nt < N; ++nt) {
      s[nt][0] = exp2_ftz(fmaf(s[nt][0], scale_log2, -mn_lo));
      s[nt][1] = exp2_ftz(fmaf(s[nt][1], scale_log2, -mn_lo));
      s[nt][2] = exp2_ftz(fmaf(s[nt][2], scale_log2, -mn_hi));
      s[nt][3] = exp2_ftz(fmaf(s[nt][3], scale_log2, -mn_hi));
      sums[0][nt % 4] += s[nt][0] + s[nt][1];
      sums[1][nt % 4] += s[nt][2] + s[nt][3];
    }
    l_lo = l_lo * alpha_lo + ((sums[0][0] + sums[0][1]) + (sums[0][2] + sums[0][3]));
    l_hi = l_hi * alpha_hi + ((sums[1][0] + sums[1][1]) + (sums[1][2] + sums[1][3]));
  }

  // 1 / (row sum) of both rows, summed over the 4 lanes that share them.
  __device__ __forceinline__ void inverse_sums(float& inv_lo, float& inv_hi) const {
    float lo = l_lo, hi = l_hi;
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      lo += __shfl_xor_sync(0xffffffffu, lo, off);
      hi += __shfl_xor_sync(0xffffffffu, hi, off);
    }
    inv_lo = 1.f / lo;
    inv_hi = 1.f / hi;
  }
};

// O [D/8 tiles][4] *= alpha of its row; skipped when no row of the warp changed its max
// (most tiles once the max has settled).
template <int N>
__device__ __forceinline__ void rescale_rows(float (&o)[N][4], float alpha_lo, float alpha_hi) {
  if (!__any_sync(0xffffffffu, alpha_lo != 1.f || alpha_hi != 1.f)) return;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    o[i][0] *= alpha_lo;
    o[i][1] *= alpha_lo;
    o[i][2] *= alpha_hi;
    o[i][3] *= alpha_hi;
  }
}

// The A fragment (m16n8k16 / wgmma register layout) of keys 16kk..16kk+15 of P = s.
template <typename T, int N>
__device__ __forceinline__ void p_fragment(uint32_t (&a)[4], const float (&s)[N][4], int kk) {
  a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

}  // namespace cuda
}  // namespace tokenspeed
