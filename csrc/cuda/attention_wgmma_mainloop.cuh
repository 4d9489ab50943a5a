/*
 * The two roles of the wgmma attention kernel (attention_wgmma.cuh) and the shared memory
 * they pass buffers through.
 *
 * Producer (warpgroup 0): takes the block's work items from the tile scheduler, describes
 * each in shared memory for the consumers, looks up pages and issues the loads of Q and
 * K/V tiles into their slots: TMA boxes of whole pages where pages hold 64 keys or more,
 * of 64 keys where smaller pages lie consecutively in the cache, cp.async gathers for the
 * rest. Each slot is handed over through a "full" mbarrier (arrived on by
 * the cp.async copies themselves, and waiting for the TMA boxes' bytes) and handed back
 * through an "empty" one.
 *
 * Consumers (warpgroups 1 and 2): own 64 query rows each of every item and only compute.
 * Per iteration: S_g = Q K_g^T (D / 16 m64n128k16 wgmmas, Q and K K-major in shared
 * memory), then O += P_{g-1} V_{g-1} (8 m64nDk16 wgmmas, P from registers, V MN-major and
 * transposed by the instruction); the softmax of tile g runs while the tensor cores do
 * the latter. They never meet at a block barrier and take turns to issue their products
 * (ping-pong), so one runs its softmax while the tensor cores serve the other. Every wgmma and wait lies
 * on a path all warps of the warpgroup take: ptxas serialises the wgmmas otherwise
 * (C7515/C7518), so both consumers walk all of an item's tiles.
 *
 * Buffers: Q in 2 slots (the next item's Q loads a whole item ahead), K in 2 and V in 3
 * (a tile's K is released once S = Q K^T has retired, its V only after O += P V of the
 * next iteration), so tile g loads from the end of iteration g - 2 on. All tiles are
 * 128-byte swizzled.
 */
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/attention_softmax.cuh"
#include "cuda/attention_tile.cuh"
#include "cuda/attention_wgmma_barriers.cuh"
#include "cuda/attention_wgmma_scheduler.cuh"
#include "cuda/launch.h"
#include "cuda/pipeline.cuh"
#include "cuda/ptx_sm80.cuh"
#include "cuda/wgmma.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kSm90Producers = 128;  // one warpgroup
constexpr int kSm90Consumers = 2;    // warpgroups of 64 query rows each
constexpr int kSm90ConsumerThreads = kSm90Consumers * 128;
constexpr int kSm90ConsumerWarps = kSm90Consumers * 4;
constexpr int kSm90Threads = kSm90Producers + kSm90ConsumerThreads;
// Two producer threads per Q row or key row (each copy instruction then reads whole
// 32-byte sectors), so the producer copies a tile in passes of this many rows.
constexpr int kSm90Pass = kSm90Producers / 2;
constexpr int kSm90Rows = kSm90Consumers * 64;
// S is one m64n128 wgmma per 16 columns of D, so a K/V tile is 128 keys (faster than
// 64-key tiles: bench/NOTES.md).
constexpr int kSm90Keys = 128;
constexpr int kSm90QSlots = 2, kSm90KSlots = 2, kSm90VSlots = 3;
// Item k is described in slot k % kSm90ItemSlots. The producer writes it once both
// consumers have retired item k - 2's last S; they may still be storing item k - 3 then
// (an item is stored during the next one's first tile), so items k - 3 .. k are live.
constexpr int kSm90ItemSlots = 4;
// Register budgets after setmaxnreg (128 x 120 + 256 x 192 = 168 x 384, the launch's
// pool): neither role spills (ptxas). At 56 / 224 the producer spilled 176 bytes and
// reloaded them from local memory at every item (about 41 loads a warp), which cost the
// dense shapes 5-13% (bench/NOTES.md).
constexpr int kSm90ProducerRegs = 120, kSm90ConsumerRegs = 192;
static_assert(kSm90Rows == kRowsM, "both tiled kernels tile the packed rows alike");

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

// The kernel's shared memory. q_full: the copies of every producer thread + the
// description; the other barriers: one arrival per producer thread (full) or per
// consumer warp (empty).
template <typename T>
struct Sm90Smem {
  T* sQ;  // [kSm90QSlots][kSm90Rows x D]
  T* sK;  // [kSm90KSlots][kSm90Keys x D]
  T* sV;  // [kSm90VSlots][kSm90Keys x D]
  Sm90Item* items;  // [kSm90ItemSlots]
  uint64_t *q_full, *q_empty;              // [kSm90QSlots]
  uint64_t *kv_full, *k_empty, *v_empty;   // [kSm90VSlots], [kSm90KSlots], [kSm90VSlots]
  volatile float* softmax_done;            // [kSm90ConsumerThreads], see the consumer

  // By one thread, before the block's first barrier.
  __device__ __forceinline__ void init_barriers() const {
    for (int i = 0; i < kSm90QSlots; ++i) {
      pipe::mbar_init(&q_full[i], kSm90Producers + 1);
      pipe::mbar_init(&q_empty[i], kSm90ConsumerWarps);
    }
    for (int i = 0; i < kSm90KSlots; ++i) pipe::mbar_init(&k_empty[i], kSm90ConsumerWarps);
    for (int i = 0; i < kSm90VSlots; ++i) {
      pipe::mbar_init(&kv_full[i], kSm90Producers);
      pipe::mbar_init(&v_empty[i], kSm90ConsumerWarps);
    }
    pipe::fence_mbar_init();
  }
};

// Warpgroup 0: walks the block's items and their K/V tiles as one stream.
template <typename T, int D>
__device__ __forceinline__ void sm90_producer(const PagedAttnParams& p, const void* k_map,
                                              const void* v_map, Sm90Plan plan, int batch,
                                              const Sm90Smem<T>& sm, int tid) {
  Sm90TileScheduler scheduler(plan, batch);
  int g = 0;  // the stream's tile
  for (int k = 0;; ++k) {
    const int qs = k % kSm90QSlots;
    // Q slot free: item k - 2's last S has retired (and so has its description's use)
    pipe::mbar_wait(&sm.q_empty[qs], ((k / kSm90QSlots) & 1) ^ 1);
    Sm90Item& it = sm.items[k % kSm90ItemSlots];
    if (tid == 0) {
      RowTile t;
      const bool valid = scheduler.next(p, t);
      it.t = t;
      it.tiles = valid ? (t.max_qpos + kSm90Keys) / kSm90Keys : 0;
      pipe::mbar_arrive(&sm.q_full[qs]);  // publishes the description
    }
    named_sync(Sm90AttnBarrier::kProducer, kSm90Producers);  // the description, for the others
    const int tiles = it.tiles;
    if (tiles == 0) {
      pipe::mbar_arrive(&sm.q_full[qs]);  // the end: no Q follows
      break;
    }
    T* q_dst = sm.sQ + qs * kSm90Rows * D;
    for (int h = 0; h < kSm90Rows / kSm90Pass; ++h)
      it.t.load_q<T, D, kSm90Pass, kSm90Producers>(
          p, q_dst, tid, [](int r, int c) { return wgmma::sw128_offset<kSm90Rows>(r, c); },
          h * kSm90Pass);
    pipe::mbar_arrive_on_copies(&sm.q_full[qs]);
    // A tile's keys come in two halves of kSm90Pass = 64 keys, by TMA where the bit of the
    // half is set in the tile's mask, else by cp.async gathers (each thread copying part of
    // one key's row; zeros past the request). TMA boxes (4 copies a box: K and V, two
    // 64-column panels), issued by warp 0's lanes 0-1, lie within the request: a box per
    // page of 64 keys, per tile of 128 keys of a longer page, or, with smaller pages, per
    // half whose pages are consecutive in the cache (the allocator hands out runs). So a
    // request's last, partial half (or tile, with pages of 128 or more), halves of
    // scattered small pages, and every key where p.kv_tma_rows is 0, are gathered.
    static_assert(kSm90Pass == 64 && kSm90Keys == 2 * kSm90Pass, "a tile is two 64-key halves");
    const int box_rows = p.kv_tma_rows, box_pages = p.kv_tma_pages, lane = tid % 32;
    auto whole_boxes = [&](int j) {  // the halves of tile j in boxes within the request
      const int keys = it.t.kv_len - j * kSm90Keys;
      if (box_rows == 0) return 0;
      if (box_rows == kSm90Keys) return keys >= kSm90Keys ? 3 : 0;
      return (keys >= kSm90Pass ? 1 : 0) | (keys >= kSm90Keys ? 2 : 0);
    };
    constexpr int kPasses = kSm90Keys / kSm90Pass;
    int page[kPasses];   // this thread's key's page in each pass (half)
    int box_slot = 0;    // warp 0's lanes 0-1: the first cache slot of the lane's box
    int mask = 0;        // the halves of the looked-up tile that come by TMA
    // Small pages, every warp alike: bit 2t + h of run_word says that half h of tile
    // 16c + t (of chunk c) is whole and its box_pages (<= 16) pages run consecutively in
    // the cache, wherever they start; lane 2t + h holds that half's first page. Checked
    // a chunk at a time, a lane a half, when the chunk's first tile is looked up: the same
    // check a tile at a time (shuffles and a ballot per tile, in every producer warp) cost
    // the dense shapes 5% against pages of 64 keys (bench/NOTES.md).
    constexpr int kChunkTiles = 16;
    unsigned run_word = 0;
    int run_first = 0;
    auto check_runs = [&](int j) {
      const int key = (j * kPasses + lane) * kSm90Pass;  // this lane's half's first key
      bool run = key + kSm90Pass <= it.t.kv_len;
      if (run) {
        const int32_t* entry = it.t.pages + page_entry(p, key);
        run_first = __ldg(entry);
#pragma unroll 4
        for (int i = 1; i < box_pages; ++i) run &= __ldg(entry + i) == run_first + i;
      }
      run_word = __ballot_sync(0xffffffffu, run);
    };
    // Sets mask and box_slot for tile j and issues the page loads of the halves it gathers
    // (nothing waits for them): the pages of halves that come by TMA are not loaded, which
    // cost the consecutive small pages 3-7% (bench/NOTES.md).
    auto look_up = [&](int j) {
      mask = whole_boxes(j);
      if (box_pages > 1) {
        const int t = j % kChunkTiles;
        if (t == 0) check_runs(j);
        mask &= run_word >> (t * kPasses) & 3;
        const int first = __shfl_sync(0xffffffffu, run_first, t * kPasses + (lane & 1));
        if (tid < 2) box_slot = first * p.page_size;
      } else if (tid < kSm90Keys / max(box_rows, 1) && (mask >> (tid * box_rows / 64) & 1)) {
        const int key = j * kSm90Keys + tid * box_rows;
        box_slot = static_cast<int>(page_slot(p, __ldg(it.t.pages + page_entry(p, key)), key));
      }
#pragma unroll
      for (int h = 0; h < kPasses; ++h)
        if (!(mask >> h & 1))
          page[h] = it.t.page_of<kSm90Pass, kSm90Producers>(p, j * kPasses + h, tid);
    };
    look_up(0);
    for (int j = 0; j < tiles; ++j, ++g) {
      const int ks = g % kSm90KSlots, vs = g % kSm90VSlots;
      T* const dk = sm.sK + ks * kSm90Keys * D;
      T* const dv = sm.sV + vs * kSm90Keys * D;
      pipe::mbar_wait(&sm.k_empty[ks], ((g / kSm90KSlots) & 1) ^ 1);
      pipe::mbar_wait(&sm.v_empty[vs], ((g / kSm90VSlots) & 1) ^ 1);
      if (mask != 0 && tid < 32) {
        // the bytes before any copy can land; the phase also waits for thread 0's arrival
        if (tid == 0)
          pipe::mbar_expect_tx(&sm.kv_full[vs], __popc(mask) * 2u * kSm90Pass * D * sizeof(T));
        __syncwarp();
        // lane h issues half h's box; a 128-key box (lane 0) covers both
        if (box_rows == kSm90Keys ? tid == 0 : tid < 2 && (mask >> tid & 1)) {
#pragma unroll
          for (int panel = 0; panel < D / 64; ++panel) {
            const int at = panel * kSm90Keys * 64 + tid * kSm90Pass * 64;
            pipe::tma_load_3d(dk + at, k_map, &sm.kv_full[vs], panel * 64, it.t.kvh, box_slot);
            pipe::tma_load_3d(dv + at, v_map, &sm.kv_full[vs], panel * 64, it.t.kvh, box_slot);
          }
        }
      }
      if (mask != 3) {
#pragma unroll
        for (int h = 0; h < kPasses; ++h)
          if (!(mask >> h & 1))
            it.t.load_kv<T, D, kSm90Pass, kSm90Producers>(
                p, j * kPasses + h, page[h], dk, dv, tid, [h](int r, int c) {
                  return wgmma::sw128_offset<kSm90Keys>(r + h * kSm90Pass, c);
                });
      }
      pipe::mbar_arrive_on_copies(&sm.kv_full[vs]);
      if (j + 1 < tiles) look_up(j + 1);  // the next tile's pages, while these copies land
    }
  }
  cp_async_wait<0>();
}

// Warpgroups 1 and 2 (consumer c = 0, 1 owns rows 64c .. 64c + 63 of each item): S, the
// softmax and O += P V of each tile, and each item's output.
template <typename T, int D>
__device__ __forceinline__ void sm90_consumer(const PagedAttnParams& p, const Sm90Smem<T>& sm,
                                              int tid, int lane) {
  const int ctid = tid - kSm90Producers, cw = ctid / 32, c = cw / 4;
  Sm90Item* const items = sm.items;
  constexpr uint32_t kPanelBytes = kSm90Keys * 128;  // one 64-column panel of a K/V tile
  // S = Q K^T of K slot ks into s (async; the caller commits): this warpgroup's 64 rows
  // of the Q slot and the tile's K, both K-major from shared memory
  auto issue_s = [&](int qs, int ks, float (&s)[kSm90Keys / 8][4]) {
    const T* tk = sm.sK + ks * kSm90Keys * D;
    const T* tq = sm.sQ + qs * kSm90Rows * D + c * 64 * 64;
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
    const T* tv = sm.sV + vs * kSm90Keys * D;
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kSm90Keys / 16; ++kk) {
      // 16 keys x D: MN-major, 64-column panels kPanelBytes apart, 8-key groups 1 KB apart
      const uint64_t desc = wgmma::sw128_desc(tv + kk * 16 * 64, kPanelBytes, 1024);
      wgmma::wgmma_rs<T, 1, D>(o, pa[kk], desc, 1);
    }
  };

  // This thread's two rows (lane / 4 and lane / 4 + 8 of the warp's 16).
  const int r_lo = cw * 16 + lane / 4;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  RowSoftmax softmax;
  int g = 0;         // the stream's tile
  int j = 0, k = 0;  // tile j of item k
  float s[kSm90Keys / 8][4];
  // Ping-pong: warpgroup 1 hands the first turn to warpgroup 0.
  if (c == 1) named_arrive(consumer_turn(0), kSm90ConsumerThreads);
  for (;; ++g) {
    const bool first = j == 0;
    if (first) {  // the item's Q and description
      pipe::mbar_wait(&sm.q_full[k % kSm90QSlots], (k / kSm90QSlots) & 1);
      if (items[k % kSm90ItemSlots].tiles == 0) break;  // past the block's last item
    }
    pipe::mbar_wait(&sm.kv_full[g % kSm90VSlots], (g / kSm90VSlots) & 1);
    wgmma::fence_proxy_async_shared();  // the producer's cp.async data -> wgmma's proxy

    // S_g, then O += P_{g-1} V_{g-1} behind it: the softmax of tile g runs while the
    // tensor cores do the latter. (At g = 0, P is zero: adds nothing.) On an item's first
    // tile the latter finishes the previous item, stored below. Both warpgroups walk all
    // the item's tiles; a warpgroup's tiles past its rows are fully masked, add nothing.
    named_sync(consumer_turn(c), kSm90ConsumerThreads);  // this warpgroup's turn
    issue_s(k % kSm90QSlots, g % kSm90KSlots, s);
    wgmma::commit();
    issue_pv((g > 0 ? g - 1 : 0) % kSm90VSlots);
    wgmma::commit();
    named_arrive(consumer_turn(1 - c), kSm90ConsumerThreads);  // the other's turn
    wgmma::wait<1>();
    wgmma::fence_operand(s);
    const int tiles = items[k % kSm90ItemSlots].tiles;
    if (lane == 0) {  // S_g has retired: its K slot, and on the item's last tile its Q slot
      pipe::mbar_arrive(&sm.k_empty[g % kSm90KSlots]);
      if (j + 1 == tiles) pipe::mbar_arrive(&sm.q_empty[k % kSm90QSlots]);
    }

    float inv_lo, inv_hi;
    if (first) {  // the previous item's row sums, then a fresh softmax
      softmax.inverse_sums(inv_lo, inv_hi);
      softmax = RowSoftmax();
    }
    float alpha_lo, alpha_hi;  // 0 on an item's first tile: O restarts from zero
    {
      const RowTile& t = items[k % kSm90ItemSlots].t;
      // this thread's rows' positions, needed only where the tile crosses the diagonal
      int qpos_lo = INT_MAX, qpos_hi = INT_MAX;
      if ((j + 1) * kSm90Keys - 1 > t.min_qpos) {
        qpos_lo = t.qpos(r_lo);
        qpos_hi = t.qpos(r_lo + 8);
      }
      softmax.tile(s, j * kSm90Keys, t.min_qpos, qpos_lo, qpos_hi, lane, p.scale_log2,
                   alpha_lo, alpha_hi);
    }

    // O and P are free once O += P_{g-1} V_{g-1} retires. ptxas hoists this wait to the
    // start of the softmax (nothing in the softmax depends on it) but keeps shared-memory
    // stores ahead of it, so storing the softmax's result keeps the whole softmax ahead of
    // the wait, overlapping O += P_{g-1} V_{g-1} (check the SASS: scripts/run_gpu.sh sass).
    sm.softmax_done[ctid] = softmax.l_lo + softmax.l_hi;
    wgmma::wait<0>();
    wgmma::fence_operand(o);
    if (g > 0 && lane == 0) pipe::mbar_arrive(&sm.v_empty[(g - 1) % kSm90VSlots]);
    if (first && g > 0)
      items[(k + kSm90ItemSlots - 1) % kSm90ItemSlots].t.store<T, D>(p, o, r_lo, lane, inv_lo,
                                                                     inv_hi);
    rescale_rows(o, alpha_lo, alpha_hi);
#pragma unroll
    for (int kk = 0; kk < kSm90Keys / 16; ++kk) p_fragment<T>(pa[kk], s, kk);
    if (++j == tiles) {
      j = 0;
      ++k;
    }
  }
  // warpgroup 1's last hand-over (it arrives once more than warpgroup 0 waits in the loop)
  if (c == 0) named_sync(consumer_turn(0), kSm90ConsumerThreads);
  if (g == 0) return;  // the block had no items
  // the last item's last O += P V
  issue_pv((g - 1) % kSm90VSlots);
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_operand(o);

  float inv_lo, inv_hi;
  softmax.inverse_sums(inv_lo, inv_hi);
  items[(k + kSm90ItemSlots - 1) % kSm90ItemSlots].t.store<T, D>(p, o, r_lo, lane, inv_lo,
                                                                 inv_hi);
}

}  // namespace cuda
}  // namespace tokenspeed
