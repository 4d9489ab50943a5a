/*
 * Paged causal GQA prefill attention (flash-attention style, mma.sync tensor cores).
 *
 * Fuses Q K^T, the causal mask, the online softmax (fp32 running max and sum) and P V in
 * one kernel. Never writes the scores or probabilities to memory: S and P live in
 * registers, K/V tiles in shared memory, and only the normalised output is stored.
 *
 * Tiling: one block (8 warps) per (kv head, request, tile of kRowsM = 128 packed query
 * rows). A KV group's query heads are packed together: packed row r of a request is token
 * r / G, query head kv_head * G + r % G, so every K/V tile read from the cache serves all
 * G heads. Each warp owns 16 packed rows; K/V tiles of kKeysN = 64 keys are gathered from
 * the page table with cp.async (16-byte vectors, two stages, zero-filled past kv_len) into
 * XOR-swizzled shared memory and fed to m16n8k16 bf16/fp16 mma with fp32 accumulation via
 * ldmatrix. A tile's keys run only up to its last row's position (fully masked tiles are
 * never visited), and the mask is applied only on tiles that cross the diagonal. Each block
 * walks its KV range alone and in order, so a request's result does not depend on the rest
 * of the batch. Page lookups use shift/mask when the page size is a power of two (16, 64,
 * ...) and a division otherwise.
 *
 * paged_attention_simple_kernel is the fallback for fp32 and head dims other than 64/128:
 * one warp per (token, query head), fp32 online softmax over the keys one at a time.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {

constexpr int kRowsM = 128;
constexpr int kKeysN = 64;
constexpr int kAttnWarps = 8;
constexpr int kAttnThreads = kAttnWarps * 32;

template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  // col is a multiple of 8 elements (one 16-byte chunk); XOR the chunk with row % 8
  return row * D + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

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

// 2^x in one MUFU.EX2; results below 2^-126 flush to zero (exp2f spends three more
// instructions per call on them, a third of the softmax's work: nothing a probability
// that small changes).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Online softmax of this thread's two rows (lane / 4 and lane / 4 + 8 of its warp's 16)
// over S tiles in the mma.m16n8 accumulator layout (s[i]: keys 8i + 2 * (lane % 4) + {0,1},
// entries 0-1 the low row, 2-3 the high row); shared by the mma.sync and wgmma kernels.
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

// A tile of packed query rows: kv head kvh of request b, packed rows row0 .. row_last
// (row r is token r / G, query head kvh * G + r % G of the request's new tokens); shared
// by the mma.sync and wgmma kernels.
struct RowTile {
  int kvh, b, q_begin, G, rows_total, row0, kv_len, prefix, row_last, min_qpos, max_qpos;
  const int32_t* pages;  // the request's page table row

  // The tile of grid block (kv head x, tile y, request z): false when it lies past the
  // request (the grid covers the longest one).
  __device__ __forceinline__ bool init(const PagedAttnParams& p, int rows) {
    return init(p, rows, blockIdx.x, gridDim.y - 1 - blockIdx.y, blockIdx.z);
  }

  // Work item w of hk x B x tiles: kv head fastest, then the request, then the tile, the
  // longest first (every request's last tile, then the ones before).
  __device__ __forceinline__ bool init_item(const PagedAttnParams& p, int rows, int tiles,
                                            int batch, int w) {
    const int rest = w / p.hk;
    return init(p, rows, w % p.hk, tiles - 1 - rest / batch, rest % batch);
  }

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

  // Writes this thread's two rows (block rows r_lo and r_lo + 8) of O / l.
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

// Smem: Q [kRowsM][D], K [2][kKeysN][D], V [2][kKeysN][D], all swizzled.
template <int D>
constexpr int paged_attention_smem_bytes() {
  return (kRowsM + 4 * kKeysN) * D * 2;
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, 2)
    paged_attention_mma_kernel(const PagedAttnParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kRowsM * D;
  T* sV = sK + 2 * kKeysN * D;

  RowTile t;
  if (!t.init(p, kRowsM)) return;
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

  // This thread's two rows (lane / 4 and lane / 4 + 8 of the warp's 16); rows past the
  // request borrow the last valid row's position so their softmax stays finite.
  const int r_lo = warp * 16 + lane / 4;
  const int qpos_lo = t.prefix + min(t.row0 + r_lo, t.row_last) / t.G;
  const int qpos_hi = t.prefix + min(t.row0 + r_lo + 8, t.row_last) / t.G;

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

// Fallback: one warp per (token, query head); each lane holds dims lane, lane + 32, ...
template <typename T, int kMaxDimPerLane>
__global__ void paged_attention_simple_kernel(const PagedAttnParams p, const int32_t* req_of,
                                              int64_t n_tokens) {
  const int64_t warp_id = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp_id >= n_tokens * p.hq) return;
  const int64_t token = warp_id / p.hq;
  const int head = warp_id % p.hq, kvh = head / p.group, D = p.head_dim;
  const int b = req_of[token];
  const int q_begin = p.cu_seqlens[b], n_new = p.cu_seqlens[b + 1] - q_begin;
  const int qpos = p.kv_lens[b] - n_new + int(token - q_begin);
  const int32_t* pages = p.page_table + int64_t(b) * p.pt_stride;
  const T* q = static_cast<const T*>(p.q) + token * p.q_stride + int64_t(head) * D;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  float qr[kMaxDimPerLane], acc[kMaxDimPerLane];
#pragma unroll
  for (int i = 0; i < kMaxDimPerLane; ++i) {
    const int d = lane + 32 * i;
    qr[i] = d < D ? float(q[d]) : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int key = 0; key <= qpos; ++key) {
    const int64_t base = (page_slot(p, pages[page_entry(p, key)], key) * p.hk + kvh) * D;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxDimPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) dot = fmaf(qr[i], float(kc[base + d]), dot);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float x = dot * p.scale_log2;
    const float mn = fmaxf(m, x);
    const float alpha = exp2f(m - mn), e = exp2f(x - mn);
    l = l * alpha + e;
    m = mn;
#pragma unroll
    for (int i = 0; i < kMaxDimPerLane; ++i) {
      const int d = lane + 32 * i;
      acc[i] = acc[i] * alpha + (d < D ? e * float(vc[base + d]) : 0.f);
    }
  }
  T* out = static_cast<T*>(p.out) + (token * p.hq + head) * D;
#pragma unroll
  for (int i = 0; i < kMaxDimPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < D) out[d] = T(acc[i] / l);
  }
}

}  // namespace cuda
}  // namespace tokenspeed
