/*
 * Paged causal GQA prefill attention for Hopper (sm_90a): warpgroup MMA (wgmma).
 *
 * Same contract and tiling as paged_attention_mma_kernel (attention.cuh): one block per
 * (kv head, request, tile of 128 packed query rows), a KV group's query heads packed
 * together, K/V tiles gathered from the page table with cp.async, fully
 * masked tiles never visited, each block walking its KV range alone and in order (a
 * request's result does not depend on the rest of the batch), fp32 online softmax.
 *
 * What differs: two warpgroups of 4 warps each own 64 query rows. Q is read from the cache
 * once and kept in registers as wgmma A fragments; S = Q K^T is 8 m64nKk16 wgmmas (K the
 * tile's keys) with K^T straight from shared memory (K-major), and O += P V is K/16
 * m64n128k16 wgmmas with P from registers and V from shared memory (MN-major, transposed
 * by the instruction). The softmax of tile j runs while the tensor cores compute
 * O += P_{j-1} V_{j-1}, and the page lookups and cp.async copies of a later tile are
 * issued while they compute S_j. K/V tiles sit in 128-byte-swizzled shared memory in a
 * cp.async ring. One block per SM (256 threads, up to 255 registers each: 64 for O,
 * K/2 for S, 32 for Q). Every wgmma and wait lies on a path all warps take: ptxas
 * serialises the wgmmas otherwise (C7515/C7518).
 *
 * D = 128 only: a D = 64 build gave wrong results on the H200, cause not found (its S
 * product is the m64n64k16 path that is right at D = 128, which points at the transposed
 * V product with N = 64), so head dim 64 runs the mma.sync kernel everywhere.
 */
#pragma once

#include "cuda/attention.cuh"
#include "cuda/wgmma.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kSm90Warpgroups = 2;
constexpr int kSm90Threads = kSm90Warpgroups * 128;
constexpr int kSm90Rows = kSm90Warpgroups * 64;
// The K/V ring: a stage is rewritten load_ahead tiles after its tile was computed; tile
// j - 1's V is still read during tile j, so the ring holds load_ahead + 2 stages.
template <int kKeys, int kStages>
struct Sm90Pipe {
  static constexpr int keys = kKeys;  // keys per K/V tile
  static constexpr int stages = kStages;
  static constexpr int load_ahead = kStages - 2;
};
static_assert(kSm90Rows == kRowsM, "both kernels tile the packed rows alike");

// Q [128][D] + K and V [stages][64][D], plus slack to align the tiles to 1024 bytes.
template <int D, typename Pipe>
constexpr int paged_attention_wgmma_smem_bytes() {
  return (kSm90Rows + 2 * Pipe::stages * Pipe::keys) * D * 2 + 1024;
}

template <typename T, int D, typename Pipe>
__global__ void __launch_bounds__(kSm90Threads, 1)
    paged_attention_wgmma_kernel(const PagedAttnParams p) {
  static_assert(D == 128, "head dim 64 runs the mma.sync kernel (see above)");
#ifdef TS_SM90A_DEVICE
  constexpr int kSm90Keys = Pipe::keys;
  extern __shared__ unsigned char smem_raw[];
  // 128-byte swizzle atoms start on 1024-byte boundaries
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  T* sQ = reinterpret_cast<T*>(smem_raw + ((1024u - (smem_base & 1023u)) & 1023u));
  T* sK = sQ + kSm90Rows * D;
  T* sV = sK + Pipe::stages * kSm90Keys * D;

  RowTile t;
  if (!t.init(p, kSm90Rows)) return;
  const int num_kv_tiles = (t.max_qpos + kSm90Keys) / kSm90Keys;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  t.load_q<T, D, kSm90Rows, kSm90Threads>(
      p, sQ, tid, [](int r, int c) { return wgmma::sw128_offset<kSm90Rows>(r, c); });
  auto load_kv = [&](int j, int stage) {
    t.load_kv<T, D, kSm90Keys, kSm90Threads>(
        p, j, sK + stage * kSm90Keys * D, sV + stage * kSm90Keys * D, tid,
        [](int r, int c) { return wgmma::sw128_offset<kSm90Keys>(r, c); });
  };
  // one commit group per tile (Q rides with tile 0), Pipe::load_ahead tiles ahead
#pragma unroll
  for (int s = 0; s < Pipe::load_ahead; ++s) {
    if (s < num_kv_tiles) load_kv(s, s);
    cp_async_commit();
  }
  cp_async_wait<Pipe::load_ahead - 1>();  // Q and tile 0
  wgmma::fence_proxy_async_shared();
  __syncthreads();

  // This warp's 16 rows of Q as A fragments, once for every tile.
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int mi = lane / 8;
    const int row = warp * 16 + (lane % 8) + (mi % 2) * 8;
    ldmatrix_x4(qa[kk], sQ + wgmma::sw128_offset<kSm90Rows>(row, kk * 16 + (mi / 2) * 8));
  }

  // This thread's two rows (lane / 4 and lane / 4 + 8 of the warp's 16); rows past the
  // request borrow the last valid row's position so their softmax stays finite.
  const int r_lo = warp * 16 + lane / 4;
  const int qpos_lo = t.prefix + min(t.row0 + r_lo, t.row_last) / t.G;
  const int qpos_hi = t.prefix + min(t.row0 + r_lo + 8, t.row_last) / t.G;

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  RowSoftmax sm;
  constexpr uint32_t kPanelBytes = kSm90Keys * 128;  // one 64-column panel of a K/V tile

  // S = Q K_j^T into s (async; the caller commits)
  auto issue_s = [&](int j, float (&s)[kSm90Keys / 8][4]) {
    const T* tk = sK + (j % Pipe::stages) * kSm90Keys * D;
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t desc = wgmma::sw128_desc(tk + (kk / 4) * kSm90Keys * 64 + (kk % 4) * 16,
                                              16, 1024);
      if constexpr (kSm90Keys == 64)
        wgmma::wgmma_rs_n64<T, 0>(s, qa[kk], desc, kk > 0);
      else
        wgmma::wgmma_rs_n128<T, 0>(s, qa[kk], desc, kk > 0);
    }
  };
  // O += P V_j (async; the caller commits)
  uint32_t pa[kSm90Keys / 16][4] = {};
  auto issue_pv = [&](int j) {
    const T* tv = sV + (j % Pipe::stages) * kSm90Keys * D;
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kSm90Keys / 16; ++kk) {
      // 16 keys x D: MN-major, 64-column panels kPanelBytes apart, 8-key groups 1 KB apart
      const uint64_t desc = wgmma::sw128_desc(tv + kk * 16 * 64, kPanelBytes, 1024);
      wgmma::wgmma_rs_n128<T, 1>(o, pa[kk], desc, 1);
    }
  };

  float s[kSm90Keys / 8][4];
  for (int j = 0; j < num_kv_tiles; ++j) {
    // Tile j has landed. Tile j + load_ahead goes to the stage of a tile every warpgroup
    // has finished with: each retires all its wgmmas before it reaches this barrier.
    cp_async_wait<Pipe::load_ahead - 1>();
    wgmma::fence_proxy_async_shared();  // this thread's cp.async data -> wgmma's proxy
    __syncthreads();

    // S_j, then O += P_{j-1} V_{j-1} behind it: the softmax of tile j runs while the
    // tensor cores do the latter. (At j = 0, P is zero and V is tile 0's: adds nothing.)
    // Every wgmma and wait is on a path all warps take (ptxas serialises the wgmmas
    // otherwise), so both warpgroups walk all the block's tiles; a warpgroup's tiles past
    // its rows are fully masked and add nothing.
    issue_s(j, s);
    wgmma::commit();
    issue_pv(j > 0 ? j - 1 : 0);
    wgmma::commit();
    {  // the page lookups and copies of a later tile, while the tensor cores work
      const int nj = j + Pipe::load_ahead;
      if (nj < num_kv_tiles) load_kv(nj, nj % Pipe::stages);
      cp_async_commit();
    }
    wgmma::wait<1>();
    wgmma::fence_operand(s);

    float alpha_lo, alpha_hi;
    sm.tile(s, j * kSm90Keys, t.min_qpos, qpos_lo, qpos_hi, lane, p.scale_log2, alpha_lo,
            alpha_hi);

    // O and P are free once O += P_{j-1} V_{j-1} retires.
    wgmma::wait<0>();
    wgmma::fence_operand(o);
    rescale_rows(o, alpha_lo, alpha_hi);
#pragma unroll
    for (int kk = 0; kk < kSm90Keys / 16; ++kk) p_fragment<T>(pa[kk], s, kk);
  }
  // the last tile's O += P V (its stage is never reloaded: no tile follows)
  issue_pv(num_kv_tiles - 1);
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_operand(o);
  cp_async_wait<0>();

  float inv_lo, inv_hi;
  sm.inverse_sums(inv_lo, inv_hi);
  t.store<T, D>(p, o, r_lo, lane, inv_lo, inv_hi);
#endif  // TS_SM90A_DEVICE
}

}  // namespace cuda
}  // namespace tokenspeed
