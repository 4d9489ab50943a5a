/*
 * Paged causal GQA prefill attention for Hopper (sm_90a): warpgroup MMA (wgmma).
 *
 * Same contract and tiling as paged_attention_mma_kernel (attention.cuh): work items of
 * (kv head, request, tile of 128 packed query rows), a KV group's query heads packed
 * together, K/V tiles gathered from the page table with cp.async, fully masked tiles
 * never visited, each item's KV range walked by one block alone and in order (a request's
 * result does not depend on the rest of the batch), fp32 online softmax.
 *
 * Persistent: one block per SM takes items in rounds (longest tiles first, snake order
 * across the blocks) and walks their K/V tiles as one stream, so the next item's first
 * tile loads while the current one computes (its Q as soon as the current item's last
 * S = Q K^T has retired), and its first S runs while the last O += P V of the previous
 * item does. At one block per SM, a block per item left the tensor cores idle at each
 * item's start and end (about two tiles' time each).
 *
 * What differs: two warpgroups of 4 warps each own 64 query rows. S = Q K^T is 8
 * m64n128k16 wgmmas with Q and K both K-major in shared memory, and O += P V is 8
 * m64n128k16 wgmmas with P from registers and V from shared memory (MN-major, transposed
 * by the instruction). The softmax of tile j runs while the tensor cores compute
 * O += P_{j-1} V_{j-1}, and the page lookups and cp.async copies of a later tile are
 * issued while they compute S_j. Q, K and V sit in 128-byte-swizzled shared memory, K/V
 * in a cp.async ring of 128-key tiles. One block per SM (256 threads, up to 255 registers
 * each: 64 for O, 64 for S, 32 for P). Q stays in shared memory rather than registers
 * because ptxas, short of registers, otherwise moves the wait for O += P V ahead of the
 * softmax, which then no longer overlaps it. Every wgmma and wait lies on a path all
 * warps take: ptxas serialises the wgmmas otherwise (C7515/C7518).
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
// The K/V ring of 128-key tiles (measured faster than 64-key tiles with 4 stages on 5 of
// the 6 benchmark shapes, bench/NOTES.md): a tile loads one tile ahead of the one computed,
// and tile j - 1's V is still read during tile j, so the ring holds 3 stages (225 KB with
// Q). S is one m64n128 wgmma per 16 columns of D, so the tile is 128 keys.
constexpr int kSm90Keys = 128;
constexpr int kSm90Stages = 3;
static_assert(kSm90Rows == kRowsM, "both kernels tile the packed rows alike");

// Q [128][D] + K and V [stages][keys][D], plus slack to align the tiles to 1024 bytes.
template <int D>
constexpr int paged_attention_wgmma_smem_bytes() {
  return (kSm90Rows + 2 * kSm90Stages * kSm90Keys) * D * 2 + 1024;
}

// A work item as the loader saw it, for the warps that compute and store it later.
struct Sm90Item {
  RowTile t;
  int tiles;  // K/V tiles it visits; 0 marks the end of the block's items
};

template <typename T, int D>
__global__ void __launch_bounds__(kSm90Threads, 1)
    paged_attention_wgmma_kernel(const PagedAttnParams p, const int tiles_per_request,
                                 const int batch) {
  static_assert(D == 128, "head dim 64 runs the mma.sync kernel (see above)");
#ifdef TS_SM90A_DEVICE
  extern __shared__ unsigned char smem_raw[];
  // 128-byte swizzle atoms start on 1024-byte boundaries
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  T* sQ = reinterpret_cast<T*>(smem_raw + ((1024u - (smem_base & 1023u)) & 1023u));
  T* sK = sQ + kSm90Rows * D;
  T* sV = sK + kSm90Stages * kSm90Keys * D;
  // Items k - 1 (being stored), k (computed), k + 1 (loading) and k + 2 (described), by
  // k % 4.
  __shared__ Sm90Item items[4];
  __shared__ volatile float softmax_done[kSm90Threads];  // see the wait for O += P V

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // The loader walks the block's items and their tiles as one stream, so the next item's
  // Q and first K/V tiles load while this one computes: the pipeline never drains between
  // items. Round r gives block i item r * gridDim.x + i, or + gridDim.x - 1 - i in odd
  // rounds: items come longest first, so the snake order evens out the blocks' sums
  // (items past their request are skipped). Each item is described in shared memory (by
  // thread 0) one barrier before it is needed.
  const int num_items = p.hk * tiles_per_request * batch;
  // Thread 0 finds the items: the next item number and the step to the one after (the
  // steps alternate between 2 (G - i) - 1 and 2 i + 1) live in shared memory with it.
  __shared__ int next_w, next_step;
  auto describe = [&](int slot) {
    if (tid != 0) return;
    RowTile t;
    bool valid = false;
    int w = next_w, step = next_step;
    while (w < num_items && !valid) {
      valid = t.init_item(p, kSm90Rows, tiles_per_request, batch, w);
      w += step;
      step = 2 * gridDim.x - step;
    }
    next_w = w;
    next_step = step;
    items[slot].t = t;
    items[slot].tiles = valid ? (t.max_qpos + kSm90Keys) / kSm90Keys : 0;
  };
  int k_load = 0, j_load = 0;  // the item and its tile the loader copies next
  if (tid == 0) {
    next_w = blockIdx.x;
    next_step = 2 * (gridDim.x - blockIdx.x) - 1;
  }
  describe(0);
  __syncthreads();
  if (items[0].tiles == 0) return;  // no work: leave before any wgmma
  // Q of the item in `slot`: thread t copies row t / 2, so each warpgroup its own 64 rows
  auto load_q = [&](int slot) {
    items[slot].t.load_q<T, D, kSm90Rows, kSm90Threads>(
        p, sQ, tid, [](int r, int c) { return wgmma::sw128_offset<kSm90Rows>(r, c); });
  };
  // Issues the copies of the stream's next tile into `stage` and commits them as one
  // group (an empty group past the end). Returns the item's slot when the tile is the
  // item's first (its Q is due once the current item's last S has retired), else -1.
  int page_next = -1;  // this thread's page of the item's next tile, looked up a tile early
  auto load_next = [&](int stage) {
    const Sm90Item& it = items[k_load % 4];
    int first_of = -1;
    if (it.tiles > 0) {
      if (j_load == 0) first_of = k_load % 4;
      const int page = j_load == 0 ? it.t.page_of<kSm90Keys, kSm90Threads>(p, 0, tid)
                                   : page_next;
      it.t.load_kv<T, D, kSm90Keys, kSm90Threads>(
          p, j_load, page, sK + stage * kSm90Keys * D, sV + stage * kSm90Keys * D, tid,
          [](int r, int c) { return wgmma::sw128_offset<kSm90Keys>(r, c); });
      if (j_load + 1 < it.tiles)
        page_next = it.t.page_of<kSm90Keys, kSm90Threads>(p, j_load + 1, tid);
      if (++j_load == it.tiles) {
        j_load = 0;
        describe(++k_load % 4);
      }
    }
    cp_async_commit();
    return first_of;
  };
  // The Q copies commit a group of their own, which the wait for every group at the top
  // of the loop covers.
  load_q(0);
  load_next(0);

  constexpr uint32_t kPanelBytes = kSm90Keys * 128;  // one 64-column panel of a K/V tile
  const int wg = warp / 4;
  // S = Q K^T of the tile in `stage` into s (async; the caller commits): this
  // warpgroup's 64 rows of Q and the tile's K, both K-major from shared memory
  auto issue_s = [&](int stage, float (&s)[kSm90Keys / 8][4]) {
    const T* tk = sK + stage * kSm90Keys * D;
    const T* tq = sQ + wg * 64 * 64;
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t desc_q = wgmma::sw128_desc(
          tq + (kk / 4) * kSm90Rows * 64 + (kk % 4) * 16, 16, 1024);
      const uint64_t desc_k = wgmma::sw128_desc(
          tk + (kk / 4) * kSm90Keys * 64 + (kk % 4) * 16, 16, 1024);
      wgmma::wgmma_ss_n128<T>(s, desc_q, desc_k, kk > 0);
    }
  };
  // O += P V of the tile in `stage` (async; the caller commits)
  uint32_t pa[kSm90Keys / 16][4] = {};
  float o[D / 8][4];
  auto issue_pv = [&](int stage) {
    const T* tv = sV + stage * kSm90Keys * D;
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kSm90Keys / 16; ++kk) {
      // 16 keys x D: MN-major, 64-column panels kPanelBytes apart, 8-key groups 1 KB apart
      const uint64_t desc = wgmma::sw128_desc(tv + kk * 16 * 64, kPanelBytes, 1024);
      wgmma::wgmma_rs_n128<T, 1>(o, pa[kk], desc, 1);
    }
  };

  // This thread's two rows (lane / 4 and lane / 4 + 8 of the warp's 16).
  const int r_lo = warp * 16 + lane / 4;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  RowSoftmax sm;
  int k = 0, j = 0;
  float s[kSm90Keys / 8][4];
  int g = 0;  // the stream's tile; its K/V sit in stage g % stages
  for (;; ++g) {
    // Tile g of the stream has landed. Tile g + 1 goes to the stage of a tile every
    // warpgroup has finished with: each retires all its wgmmas before this barrier.
    cp_async_wait<0>();
    wgmma::fence_proxy_async_shared();  // this thread's cp.async data -> wgmma's proxy
    __syncthreads();
    const bool first = j == 0;
    if (first && items[k % 4].tiles == 0) break;  // past the block's last item

    // S_g, then O += P_{g-1} V_{g-1} behind it: the softmax of tile g runs while the
    // tensor cores do the latter. (At g = 0, P is zero: adds nothing.) On an item's first
    // tile the latter finishes the previous item, stored below. Every wgmma and wait is
    // on a path all warps take (ptxas serialises the wgmmas otherwise), so both
    // warpgroups walk all the item's tiles; a warpgroup's tiles past its rows are fully
    // masked and add nothing.
    issue_s(g % kSm90Stages, s);
    wgmma::commit();
    issue_pv((g > 0 ? g - 1 : 0) % kSm90Stages);
    wgmma::commit();
    // the page lookups and copies of a later tile, while the tensor cores work
    const int q_due = load_next((g + 1) % kSm90Stages);
    wgmma::wait<1>();
    wgmma::fence_operand(s);
    if (q_due >= 0) {
      // This was the item's last S: once every warp of this warpgroup has seen it retire,
      // its rows of sQ take the next item's Q (landed by the top of the next iteration).
      asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
      load_q(q_due);
      cp_async_commit();
    }

    float inv_lo, inv_hi;
    if (first) {  // the previous item's row sums, then a fresh softmax
      sm.inverse_sums(inv_lo, inv_hi);
      sm = RowSoftmax();
    }
    float alpha_lo, alpha_hi;  // 0 on an item's first tile: O restarts from zero
    {
      const RowTile& t = items[k % 4].t;
      // this thread's rows' positions, needed only where the tile crosses the diagonal;
      // rows past the request borrow the last valid row's (finite softmax)
      int qpos_lo = INT_MAX, qpos_hi = INT_MAX;
      if ((j + 1) * kSm90Keys - 1 > t.min_qpos) {
        qpos_lo = t.prefix + min(t.row0 + r_lo, t.row_last) / t.G;
        qpos_hi = t.prefix + min(t.row0 + r_lo + 8, t.row_last) / t.G;
      }
      sm.tile(s, j * kSm90Keys, t.min_qpos, qpos_lo, qpos_hi, lane, p.scale_log2, alpha_lo,
              alpha_hi);
    }

    // O and P are free once O += P_{g-1} V_{g-1} retires. ptxas hoists this wait to the
    // start of the softmax (nothing in the softmax depends on it) but keeps shared-memory
    // stores ahead of it, so storing the softmax's result keeps the whole softmax ahead of
    // the wait, overlapping O += P_{g-1} V_{g-1} (seen in the SASS: run_gpu.sh sass).
    softmax_done[tid] = sm.l_lo + sm.l_hi;
    wgmma::wait<0>();
    wgmma::fence_operand(o);
    if (first && g > 0) items[(k + 3) % 4].t.store<T, D>(p, o, r_lo, lane, inv_lo, inv_hi);
    rescale_rows(o, alpha_lo, alpha_hi);
#pragma unroll
    for (int kk = 0; kk < kSm90Keys / 16; ++kk) p_fragment<T>(pa[kk], s, kk);
    if (++j == items[k % 4].tiles) {
      j = 0;
      ++k;
    }
  }
  // the last item's last O += P V (its stage is never reloaded: no tile follows)
  issue_pv((g - 1) % kSm90Stages);
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_operand(o);
  cp_async_wait<0>();

  float inv_lo, inv_hi;
  sm.inverse_sums(inv_lo, inv_hi);
  items[(k + 3) % 4].t.store<T, D>(p, o, r_lo, lane, inv_lo, inv_hi);
#endif  // TS_SM90A_DEVICE
}

}  // namespace cuda
}  // namespace tokenspeed
