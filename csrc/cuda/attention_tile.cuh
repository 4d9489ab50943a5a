/*
 * A tile of packed query rows over the paged K/V cache, shared by the tiled attention
 * kernels (mma.sync and wgmma): the page arithmetic (also the simple kernel's), the
 * cp.async gathers of the tile's Q rows and of its K/V tiles into shared memory, and the
 * store of its normalised output.
 *
 * A KV group's query heads are packed together: packed row r of a request is token
 * r / G, query head kv_head * G + r % G of its new tokens, so every K/V tile read from
 * the cache serves all G heads.
 */
#pragma once

#include <cstdint>

#include "cuda/launch.h"
#include "cuda/ptx_sm80.cuh"

namespace tokenspeed {
namespace cuda {

// Packed query rows per tile, in both tiled kernels (the host sizes their grids by it).
constexpr int kRowsM = 128;

// A key's page-table entry and its place in the page: shift/mask when the page size is a
// power of two, a division otherwise.
__device__ __forceinline__ int page_entry(const PagedAttnParams& p, int key) {
  return p.page_shift >= 0 ? key >> p.page_shift : key / p.page_size;
}
__device__ __forceinline__ int in_page(const PagedAttnParams& p, int key) {
  return p.page_shift >= 0 ? key & (p.page_size - 1) : key % p.page_size;
}
// The cache slot of a key given its page (the table lookup done by the caller).
__device__ __forceinline__ int64_t page_slot(const PagedAttnParams& p, int page, int key) {
  return int64_t(page) * p.page_size + in_page(p, key);
}

// Packed rows row0 .. row_last of kv head kvh of request b.
struct RowTile {
  int kvh, b, q_begin, G, rows_total, row0, kv_len, prefix, row_last, min_qpos, max_qpos;
  const int32_t* pages;  // the request's page table row

  // Tile `tile` (of `rows` rows) of kv head kv_head of request `request`: false when it
  // lies past the request.
  __device__ __forceinline__ bool init(const PagedAttnParams& p, int rows, int kv_head,
                                       int tile, int request) {
    kvh = kv_head;
    b = request;
    q_begin = p.cu_seqlens[b];
    const int n_new = p.cu_seqlens[b + 1] - q_begin;
    G = p.group;
    rows_total = n_new * G;
    row0 = tile * rows;
    if (row0 >= rows_total) return false;
    kv_len = p.kv_lens[b];
    prefix = kv_len - n_new;
    row_last = min(row0 + rows, rows_total) - 1;
    min_qpos = prefix + row0 / G;
    max_qpos = prefix + row_last / G;
    pages = p.page_table + int64_t(b) * p.pt_stride;
    return true;
  }

  // The position of tile row r; rows past the request borrow the last valid row's, so
  // their softmax stays finite.
  __device__ __forceinline__ int qpos(int r) const {
    return prefix + min(row0 + r, row_last) / G;
  }

  // The page holding this thread's key of K/V tile j (see load_kv), or -1 past the
  // request. A dependent global load: a caller can issue it a tile ahead.
  template <int kKeys, int kThreads>
  __device__ __forceinline__ int page_of(const PagedAttnParams& p, int j, int tid) const {
    const int key = j * kKeys + tid / (kThreads / kKeys);
    if (key >= kv_len) return -1;
    // __ldg: the table pointer may come from shared memory, where the compiler cannot
    // tell it points to global memory (a generic load otherwise)
    return __ldg(pages + page_entry(p, key));
  }

  // cp.async of K/V tile j (keys j * kKeys ..) from the paged caches into dk / dv at
  // element offset at(r, c), this thread's key in `page` (page_of; -1 zero-fills). Each
  // thread copies part of one key's row, so it looks up one page per tile; the
  // kThreads / kKeys threads of a key take its 16-byte chunks in turn, so each copy
  // instruction reads whole 32-byte sectors.
  template <typename T, int D, int kKeys, int kThreads, typename At>
  __device__ __forceinline__ void load_kv(const PagedAttnParams& p, int j, int page, T* dk,
                                          T* dv, int tid, At at) const {
    constexpr int kPerRow = kThreads / kKeys;
    static_assert(kThreads % kKeys == 0 && (D / 8) % kPerRow == 0, "threads per key row");
    const T* kc = static_cast<const T*>(p.k_cache);
    const T* vc = static_cast<const T*>(p.v_cache);
    const int r = tid / kPerRow, key = j * kKeys + r;
    const int at_key = in_page(p, key);
    const int64_t base =
        page >= 0 ? ((int64_t(page) * p.page_size + at_key) * p.hk + kvh) * D : 0;
#pragma unroll
    for (int m = 0; m < D / 8 / kPerRow; ++m) {
      const int c = (m * kPerRow + tid % kPerRow) * 8;
      const int dst = at(r, c);
      cp_async16(dk + dst, kc + base + c, page >= 0);
      cp_async16(dv + dst, vc + base + c, page >= 0);
    }
  }

  // cp.async of kRows of the tile's Q rows, from row r0 on, into shared memory at element
  // offset at(r, c); rows past the request are zero-filled (and never stored). Threads
  // split rows as load_kv.
  template <typename T, int D, int kRows, int kThreads, typename At>
  __device__ __forceinline__ void load_q(const PagedAttnParams& p, T* sQ, int tid, At at,
                                         int r0 = 0) const {
    constexpr int kPerRow = kThreads / kRows;
    static_assert(kThreads % kRows == 0 && (D / 8) % kPerRow == 0, "threads per q row");
    const T* q = static_cast<const T*>(p.q);
    const int r = r0 + tid / kPerRow, gr = row0 + r;
    const bool valid = gr < rows_total;
    const T* src = valid ? q + int64_t(q_begin + gr / G) * p.q_stride + (kvh * G + gr % G) * D : q;
#pragma unroll
    for (int m = 0; m < D / 8 / kPerRow; ++m) {
      const int c = (m * kPerRow + tid % kPerRow) * 8;
      cp_async16(sQ + at(r, c), src + c, valid);
    }
  }

  // Writes this thread's two rows (tile rows r_lo and r_lo + 8) of O / l, O in the
  // mma.m16n8 accumulator layout.
  template <typename T, int D>
  __device__ __forceinline__ void store(const PagedAttnParams& p, const float (&o)[D / 8][4],
                                        int r_lo, int lane, float inv_lo, float inv_hi) const {
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int gr = row0 + r_lo + half * 8;
      if (gr >= rows_total) continue;
      const float inv = half ? inv_hi : inv_lo;
      T* dst = out + (int64_t(q_begin + gr / G) * p.hq + kvh * G + gr % G) * D + (lane % 4) * 2;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(dst + dt * 8) =
            pack2<T>(o[dt][2 * half] * inv, o[dt][2 * half + 1] * inv);
    }
  }
};

}  // namespace cuda
}  // namespace tokenspeed
