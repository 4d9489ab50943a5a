/*
 * Paged causal GQA prefill attention for Hopper (sm_90a): warpgroup MMA (wgmma), warp
 * specialised.
 *
 * Same contract and tiling as paged_attention_mma_kernel (attention.cuh): work items of
 * (kv head, request, tile of 128 packed query rows), a KV group's query heads packed
 * together, K/V tiles gathered from the page table with cp.async (zero-filled past the
 * request), fully masked tiles never visited, each item's KV range walked by one block
 * alone and in order (a request's result does not depend on the rest of the batch), fp32
 * online softmax.
 *
 * Persistent: one block per SM takes items in rounds (longest tiles first, snake order
 * across the blocks) and walks their K/V tiles as one stream, so the next item's Q and
 * first tiles load while the current one computes.
 *
 * Warp specialised: warpgroup 0 is the producer. It looks up pages and issues the cp.async
 * gathers of Q and K/V tiles into shared-memory buffers, each buffer handed over through
 * a "full" mbarrier (arrived on by the copies themselves) and handed back through an
 * "empty" one. Warpgroups 1 and 2, the consumers, own 64 query rows each and only compute;
 * they never meet at a block barrier, and they take turns to issue their products
 * (ping-pong), so one runs its softmax while the tensor cores serve the other. The
 * producer gives up registers to them (setmaxnreg: 56 vs 224).
 * Before, every thread both copied and computed: the copies' issue and page lookups sat in
 * the softmax's path, and a block barrier per tile kept the two warpgroups in step.
 *
 * Buffers: Q in 2 slots (the next item's Q loads a whole item ahead), K in 2 and V in 3
 * (a tile's K is released once S = Q K^T has retired, its V only after O += P V of the
 * next iteration), so tile g loads from the end of iteration g - 2 on.
 *
 * Per consumer iteration: S_g = Q K_g^T (8 m64n128k16 wgmmas, Q and K K-major in shared
 * memory), then O += P_{g-1} V_{g-1} (8 wgmmas, P from registers, V MN-major and
 * transposed by the instruction); the softmax of tile g runs while the tensor cores do the
 * latter. All tiles 128-byte swizzled. Every wgmma and wait lies on a path all warps of
 * the warpgroup take: ptxas serialises the wgmmas otherwise (C7515/C7518).
 *
 * D = 128 only: a D = 64 build gave wrong results on the H200, cause not found (its S
 * product is the m64n64k16 path that is right at D = 128, which points at the transposed
 * V product with N = 64), so head dim 64 runs the mma.sync kernel everywhere.
 */
#pragma once

#include "cuda/attention.cuh"
#include "cuda/pipeline.cuh"
#include "cuda/wgmma.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kSm90Producers = 128;  // one warpgroup
constexpr int kSm90Consumers = 2;    // warpgroups of 64 query rows each
constexpr int kSm90ConsumerThreads = kSm90Consumers * 128;
constexpr int kSm90Threads = kSm90Producers + kSm90ConsumerThreads;
// Two producer threads per Q row or key row (each copy instruction then reads whole
// 32-byte sectors), so the producer copies a tile in passes of this many rows.
constexpr int kSm90Pass = kSm90Producers / 2;
constexpr int kSm90Rows = kSm90Consumers * 64;
// S is one m64n128 wgmma per 16 columns of D, so a K/V tile is 128 keys (measured faster
// than 64-key tiles, bench/NOTES.md).
constexpr int kSm90Keys = 128;
constexpr int kSm90QSlots = 2, kSm90KSlots = 2, kSm90VSlots = 3;
// Register budgets after setmaxnreg (128 x 56 + 256 x 224 <= 64K): the consumers use
// about 190; the producer spills a few of its loop-invariant copy offsets at 56.
constexpr int kSm90ProducerRegs = 56, kSm90ConsumerRegs = 224;
static_assert(kSm90Rows == kRowsM, "both kernels tile the packed rows alike");

// Q, K and V slots, plus slack to align the tiles to 1024 bytes.
template <int D>
constexpr int paged_attention_wgmma_smem_bytes() {
  return (kSm90QSlots * kSm90Rows + (kSm90KSlots + kSm90VSlots) * kSm90Keys) * D * 2 + 1024;
}

// A work item as the producer found it, for the consumers.
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
  T* sK = sQ + kSm90QSlots * kSm90Rows * D;
  T* sV = sK + kSm90KSlots * kSm90Keys * D;
  // Item k is described in items[k % 4]. The producer writes it once both consumers have
  // retired item k - 2's last S; they may still be storing item k - 3 then (an item is
  // stored during the next one's first tile), so items k - 3 .. k are live: four slots.
  __shared__ Sm90Item items[4];
  // q_full: the copies of every producer thread + the description; the others: one
  // arrival per producer thread (full) or per consumer warp (empty).
  __shared__ __align__(8) uint64_t q_full[kSm90QSlots], q_empty[kSm90QSlots];
  __shared__ __align__(8) uint64_t kv_full[kSm90VSlots], k_empty[kSm90KSlots],
      v_empty[kSm90VSlots];
  __shared__ volatile float softmax_done[kSm90ConsumerThreads];  // see the wait for O += P V

  const int tid = threadIdx.x, lane = tid % 32;
  constexpr int kConsumerWarps = kSm90Consumers * 4;
  if (tid == 0) {
    for (int i = 0; i < kSm90QSlots; ++i) {
      pipe::mbar_init(&q_full[i], kSm90Producers + 1);
      pipe::mbar_init(&q_empty[i], kConsumerWarps);
    }
    for (int i = 0; i < kSm90KSlots; ++i) pipe::mbar_init(&k_empty[i], kConsumerWarps);
    for (int i = 0; i < kSm90VSlots; ++i) {
      pipe::mbar_init(&kv_full[i], kSm90Producers);
      pipe::mbar_init(&v_empty[i], kConsumerWarps);
    }
    pipe::fence_mbar_init();
  }
  __syncthreads();

  if (tid < kSm90Producers) {
    // ---- producer: walks the block's items and their tiles as one stream ----
    pipe::setmaxnreg_dec<kSm90ProducerRegs>();
    // Round r gives block i item r * gridDim.x + i, or + gridDim.x - 1 - i in odd rounds:
    // items come longest first, so the snake order evens out the blocks' sums (items past
    // their request are skipped). Thread 0 finds them; the steps alternate between
    // 2 (G - i) - 1 and 2 i + 1.
    const int num_items = p.hk * tiles_per_request * batch;
    int next_w = blockIdx.x, step = 2 * (gridDim.x - blockIdx.x) - 1;
    int g = 0;  // the stream's tile
    for (int k = 0;; ++k) {
      const int qs = k % kSm90QSlots;
      // Q slot free: item k - 2's last S has retired (and so has its description's use)
      pipe::mbar_wait(&q_empty[qs], ((k / kSm90QSlots) & 1) ^ 1);
      Sm90Item& it = items[k % 4];
      if (tid == 0) {
        RowTile t;
        bool valid = false;
        while (next_w < num_items && !valid) {
          valid = t.init_item(p, kSm90Rows, tiles_per_request, batch, next_w);
          next_w += step;
          step = 2 * gridDim.x - step;
        }
        it.t = t;
        it.tiles = valid ? (t.max_qpos + kSm90Keys) / kSm90Keys : 0;
        pipe::mbar_arrive(&q_full[qs]);  // publishes the description
      }
      pipe::named_sync(1, kSm90Producers);  // the description, for the other producer threads
      const int tiles = it.tiles;
      if (tiles == 0) {
        pipe::mbar_arrive(&q_full[qs]);  // the end: no Q follows
        break;
      }
      T* q_dst = sQ + qs * kSm90Rows * D;
      for (int h = 0; h < kSm90Rows / kSm90Pass; ++h)
        it.t.load_q<T, D, kSm90Pass, kSm90Producers>(
            p, q_dst, tid, [](int r, int c) { return wgmma::sw128_offset<kSm90Rows>(r, c); },
            h * kSm90Pass);
      pipe::mbar_arrive_on_copies(&q_full[qs]);
      // this thread's page in each pass of tile j (a pass is tile j * passes + h of
      // kSm90Pass keys)
      constexpr int kPasses = kSm90Keys / kSm90Pass;
      int page[kPasses];
      auto look_up = [&](int j) {
#pragma unroll
        for (int h = 0; h < kPasses; ++h)
          page[h] = it.t.page_of<kSm90Pass, kSm90Producers>(p, j * kPasses + h, tid);
      };
      look_up(0);
      for (int j = 0; j < tiles; ++j, ++g) {
        const int ks = g % kSm90KSlots, vs = g % kSm90VSlots;
        pipe::mbar_wait(&k_empty[ks], ((g / kSm90KSlots) & 1) ^ 1);
        pipe::mbar_wait(&v_empty[vs], ((g / kSm90VSlots) & 1) ^ 1);
#pragma unroll
        for (int h = 0; h < kPasses; ++h)
          it.t.load_kv<T, D, kSm90Pass, kSm90Producers>(
              p, j * kPasses + h, page[h], sK + ks * kSm90Keys * D, sV + vs * kSm90Keys * D,
              tid, [h](int r, int c) {
                return wgmma::sw128_offset<kSm90Keys>(r + h * kSm90Pass, c);
              });
        pipe::mbar_arrive_on_copies(&kv_full[vs]);
        if (j + 1 < tiles) look_up(j + 1);  // the next tile's pages, while these copies land
      }
    }
    cp_async_wait<0>();
    return;
  }

  // ---- consumers: warpgroup c owns rows 64c .. 64c + 63 of each item ----
  pipe::setmaxnreg_inc<kSm90ConsumerRegs>();
  const int ctid = tid - kSm90Producers, cw = ctid / 32, c = cw / 4;
  constexpr uint32_t kPanelBytes = kSm90Keys * 128;  // one 64-column panel of a K/V tile
  // S = Q K^T of K slot ks into s (async; the caller commits): this warpgroup's 64 rows
  // of the Q slot and the tile's K, both K-major from shared memory
  auto issue_s = [&](int qs, int ks, float (&s)[kSm90Keys / 8][4]) {
    const T* tk = sK + ks * kSm90Keys * D;
    const T* tq = sQ + qs * kSm90Rows * D + c * 64 * 64;
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
  // O += P V of V slot vs (async; the caller commits)
  uint32_t pa[kSm90Keys / 16][4] = {};
  float o[D / 8][4];
  auto issue_pv = [&](int vs) {
    const T* tv = sV + vs * kSm90Keys * D;
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kSm90Keys / 16; ++kk) {
      // 16 keys x D: MN-major, 64-column panels kPanelBytes apart, 8-key groups 1 KB apart
      const uint64_t desc = wgmma::sw128_desc(tv + kk * 16 * 64, kPanelBytes, 1024);
      wgmma::wgmma_rs_n128<T, 1>(o, pa[kk], desc, 1);
    }
  };

  // This thread's two rows (lane / 4 and lane / 4 + 8 of the warp's 16).
  const int r_lo = cw * 16 + lane / 4;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  RowSoftmax sm;
  int k = 0, j = 0;
  float s[kSm90Keys / 8][4];
  int g = 0;  // the stream's tile
  // Ping-pong: the warpgroups take turns to issue their wgmmas (named barrier 2 + c
  // passes warpgroup c), warpgroup 0 first, so one's softmax overlaps the other's
  // products (measured 2.5% faster on average than leaving the order to the warps, most
  // on the ragged batch: bench/NOTES.md).
  if (c == 1) pipe::named_arrive(2, kSm90ConsumerThreads);
  for (;; ++g) {
    const bool first = j == 0;
    if (first) {  // the item's Q and description
      pipe::mbar_wait(&q_full[k % kSm90QSlots], (k / kSm90QSlots) & 1);
      if (items[k % 4].tiles == 0) break;  // past the block's last item
    }
    pipe::mbar_wait(&kv_full[g % kSm90VSlots], (g / kSm90VSlots) & 1);
    wgmma::fence_proxy_async_shared();  // the producer's cp.async data -> wgmma's proxy

    // S_g, then O += P_{g-1} V_{g-1} behind it: the softmax of tile g runs while the
    // tensor cores do the latter. (At g = 0, P is zero: adds nothing.) On an item's first
    // tile the latter finishes the previous item, stored below. Both warpgroups walk all
    // the item's tiles; a warpgroup's tiles past its rows are fully masked, add nothing.
    pipe::named_sync(2 + c, kSm90ConsumerThreads);  // this warpgroup's turn
    issue_s(k % kSm90QSlots, g % kSm90KSlots, s);
    wgmma::commit();
    issue_pv((g > 0 ? g - 1 : 0) % kSm90VSlots);
    wgmma::commit();
    pipe::named_arrive(3 - c, kSm90ConsumerThreads);  // the other's turn
    wgmma::wait<1>();
    wgmma::fence_operand(s);
    const int tiles = items[k % 4].tiles;
    if (lane == 0) {  // S_g has retired: its K slot, and on the item's last tile its Q slot
      pipe::mbar_arrive(&k_empty[g % kSm90KSlots]);
      if (j + 1 == tiles) pipe::mbar_arrive(&q_empty[k % kSm90QSlots]);
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
    softmax_done[ctid] = sm.l_lo + sm.l_hi;
    wgmma::wait<0>();
    wgmma::fence_operand(o);
    if (g > 0 && lane == 0) pipe::mbar_arrive(&v_empty[(g - 1) % kSm90VSlots]);
    if (first && g > 0) items[(k + 3) % 4].t.store<T, D>(p, o, r_lo, lane, inv_lo, inv_hi);
    rescale_rows(o, alpha_lo, alpha_hi);
#pragma unroll
    for (int kk = 0; kk < kSm90Keys / 16; ++kk) p_fragment<T>(pa[kk], s, kk);
    if (++j == tiles) {
      j = 0;
      ++k;
    }
  }
  // warpgroup 1's last hand-over (it arrives once more than warpgroup 0 waits in the loop)
  if (c == 0) pipe::named_sync(2, kSm90ConsumerThreads);
  if (g == 0) return;  // the block had no items
  // the last item's last O += P V
  issue_pv((g - 1) % kSm90VSlots);
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_operand(o);

  float inv_lo, inv_hi;
  sm.inverse_sums(inv_lo, inv_hi);
  items[(k + 3) % 4].t.store<T, D>(p, o, r_lo, lane, inv_lo, inv_hi);
#endif  // TS_SM90A_DEVICE
}

}  // namespace cuda
}  // namespace tokenspeed
