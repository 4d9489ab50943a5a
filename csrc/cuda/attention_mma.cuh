/*
 * Paged causal GQA prefill attention on mma.sync tensor cores (bf16/fp16, any sm_80+
 * device; head dim 64 or 128).
 *
 * Fuses Q K^T, the causal mask, the online softmax (fp32 running max and sum) and P V in
 * one kernel. Never writes the scores or probabilities to memory: S and P live in
 * registers, K/V tiles in shared memory, and only the normalised output is stored.
 *
 * Tiling: one block (8 warps) per (kv head, request, tile of kRowsM = 128 packed query
 * rows; attention_tile.cuh). Each warp owns 16 packed rows; K/V tiles of kKeysN = 64 keys
 * are gathered from the page table with cp.async (16-byte vectors, two stages,
 * zero-filled past kv_len) into XOR-swizzled shared memory and fed to m16n8k16 mma with
 * fp32 accumulation via ldmatrix. A tile's keys run only up to its last row's position
 * (fully masked tiles are never visited), and the mask is applied only on tiles that
 * cross the diagonal. Each block walks its KV range alone and in order, so a request's
 * result does not depend on the rest of the batch.
 */
#pragma once

#include <cstdint>

#include "cuda/attention_softmax.cuh"
#include "cuda/attention_tile.cuh"
#include "cuda/launch.h"
#include "cuda/ptx_sm80.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kKeysN = 64;
constexpr int kAttnWarps = 8;
constexpr int kAttnThreads = kAttnWarps * 32;

// Element offset of (row, col) in a [rows][D] tile; col is a multiple of 8 elements (one
// 16-byte chunk), XORed with row % 8 so that ldmatrix's eight rows hit distinct banks.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
}

// Smem: Q [kRowsM][D], K [2][kKeysN][D], V [2][kKeysN][D], all swizzled.
template <int D>
constexpr int paged_attention_mma_smem_bytes() {
  return (kRowsM + 4 * kKeysN) * D * 2;
}

// Grid (kv head, tile, request); tiles in reverse order, so the longest come first.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, 2)
    paged_attention_mma_kernel(const PagedAttnParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kRowsM * D;
  T* sV = sK + 2 * kKeysN * D;

  RowTile t;
  // false: the tile lies past the request (the grid covers the longest one)
  if (!t.init(p, kRowsM, blockIdx.x, gridDim.y - 1 - blockIdx.y, blockIdx.z)) return;
  const int num_kv_tiles = (t.max_qpos + kKeysN) / kKeysN;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const auto at = [](int r, int c) { return swz<D>(r, c); };

  t.load_q<T, D, kRowsM, kAttnThreads>(p, sQ, tid, at);
  auto load_kv = [&](int j, int stage) {
    t.load_kv<T, D, kKeysN, kAttnThreads>(p, j, t.page_of<kKeysN, kAttnThreads>(p, j, tid),
                                          sK + stage * kKeysN * D, sV + stage * kKeysN * D,
                                          tid, at);
  };
  load_kv(0, 0);
  cp_async_commit();

  // This thread's two rows (lane / 4 and lane / 4 + 8 of the warp's 16).
  const int r_lo = warp * 16 + lane / 4;
  const int qpos_lo = t.qpos(r_lo);
  const int qpos_hi = t.qpos(r_lo + 8);

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  RowSoftmax sm;

  for (int j = 0; j < num_kv_tiles; ++j) {
    cp_async_wait<0>();
    __syncthreads();
    if (j + 1 < num_kv_tiles) load_kv(j + 1, (j + 1) & 1);
    cp_async_commit();
    const T* tk = sK + (j & 1) * kKeysN * D;
    const T* tv = sV + (j & 1) * kKeysN * D;

    float s[kKeysN / 8][4];
#pragma unroll
    for (int i = 0; i < kKeysN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      {
        const int mi = lane / 8;
        const int row = warp * 16 + (lane % 8) + (mi % 2) * 8;
        ldmatrix_x4(a, sQ + swz<D>(row, kk * 16 + (mi / 2) * 8));
      }
#pragma unroll
      for (int nn = 0; nn < kKeysN / 16; ++nn) {
        uint32_t bk[4];
        const int mi = lane / 8;
        const int key = nn * 16 + (lane % 8) + (mi / 2) * 8;
        ldmatrix_x4(bk, tk + swz<D>(key, kk * 16 + (mi % 2) * 8));
        mma16816<T>(s[2 * nn], a, bk[0], bk[1]);
        mma16816<T>(s[2 * nn + 1], a, bk[2], bk[3]);
      }
    }

    float alpha_lo, alpha_hi;
    sm.tile(s, j * kKeysN, t.min_qpos, qpos_lo, qpos_hi, lane, p.scale_log2, alpha_lo, alpha_hi);
    rescale_rows(o, alpha_lo, alpha_hi);

#pragma unroll
    for (int kk = 0; kk < kKeysN / 16; ++kk) {
      uint32_t a[4];
      p_fragment<T>(a, s, kk);
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bv[4];
        const int mi = lane / 8;
        const int key = kk * 16 + (lane % 8) + (mi % 2) * 8;
        ldmatrix_x4_trans(bv, tv + swz<D>(key, dd * 16 + (mi / 2) * 8));
        mma16816<T>(o[2 * dd], a, bv[0], bv[1]);
        mma16816<T>(o[2 * dd + 1], a, bv[2], bv[3]);
      }
    }
  }
  cp_async_wait<0>();

  float inv_lo, inv_hi;
  sm.inverse_sums(inv_lo, inv_hi);
  t.store<T, D>(p, o, r_lo, lane, inv_lo, inv_hi);
}

}  // namespace cuda
}  // namespace tokenspeed
