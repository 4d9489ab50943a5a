/*
 * grouped_gemm: the experts' matrix products of deterministic mode, batch-invariant by
 * construction. For the rows i of expert e (bounds[e] <= i < bounds[e + 1]),
 * out[i, n] = sum over k of x[i, k] * weight[e, n, k], accumulated in fp32, rounded once.
 *
 * Invariance: output tiles are laid over each expert's rows (a tile never holds two
 * experts' rows); each block computes its tile over the whole K range alone (no split-K,
 * no atomics) and every tile walks K in the same steps, in ascending order. An output
 * element's sum is therefore the same sequence of mma (or FMA) steps whatever M, the
 * expert's row count, the row's place in its tile and the other rows' values (rows past
 * the expert's end are zero-filled and never stored). Only the dtype and K pick the path.
 * Nothing but the output and the [2 (E + 1)] tile table is written.
 *
 * Scheduling without a host sync: tiles_kernel turns the offsets into each expert's row
 * range and first row tile (one thread, in expert order), the grid covers the most tiles
 * any offsets can need (ceil(M / BM) + E row tiles times ceil(N / BN) column tiles), each
 * block finds its expert by binary search, and the surplus blocks return at once.
 * blockIdx.x runs over row tiles, so neighbouring blocks share a column tile of weight[e].
 *
 * bf16/fp16 with K % 8 == 0 (mma_kernel): a 128 x 128 output tile per block of 8 warps
 * (2 x 4, each 64 x 32); K steps of 32 through cp.async double buffering into
 * XOR-swizzled shared memory; ldmatrix and mma.sync m16n8k16 with fp32 accumulators.
 * fp32, and 16-bit inputs with K % 8 != 0 (fma_kernel): a 64 x 64 tile per block of 256
 * threads, each 4 x 4 outputs, one fp32 FMA per k in ascending order (no TF32: fp32
 * inputs keep full products).
 *
 * Speed: only deterministic mode runs these, in place of torch._grouped_mm (CUTLASS);
 * correctness and invariance come first, bench_moe.py measures the cost.
 */
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/dtype.cuh"
#include "cuda/ptx_sm80.cuh"

namespace tokenspeed {
namespace cuda {
namespace gg {

constexpr int kMmaM = 128, kMmaN = 128, kMmaK = 32, kMmaThreads = 256;
constexpr int kFmaM = 64, kFmaN = 64, kFmaK = 16, kFmaThreads = 256;

// bounds [E + 1]: expert e's rows are [bounds[e], bounds[e + 1]), the offsets clamped
// into [0, M] and made non-decreasing (unchecked offsets never reach outside x or out);
// tile_starts [E + 1]: expert e's first row tile of tile_m rows, tile_starts[E] = all.
template <typename O>
__global__ void tiles_kernel(const O* __restrict__ offsets, int E, int64_t M, int tile_m,
                             int32_t* __restrict__ bounds, int32_t* __restrict__ tile_starts) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int64_t prev = 0;
  int32_t tiles = 0;
  for (int e = 0; e <= E; ++e) {
    const int64_t b = min(max(static_cast<int64_t>(offsets[e]), prev), M);
    tiles += static_cast<int32_t>((b - prev + tile_m - 1) / tile_m);
    bounds[e] = static_cast<int32_t>(b);
    tile_starts[e] = tiles;
    prev = b;
  }
}

// One block's output tile: rows [row0, row0 + rows) of expert `expert`, columns from col0.
struct Tile {
  int expert, row0, rows, col0;

  // false: this block lies past the last tile.
  __device__ __forceinline__ bool init(const int32_t* bounds, const int32_t* tile_starts, int E,
                                       int tile_m, int tile_n) {
    const int i = blockIdx.x;
    if (i >= tile_starts[E]) return false;
    // the last expert whose first tile is <= i; an empty expert shares its first tile
    // with the next one, so the search never stops on it
    int lo = 0, hi = E - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (tile_starts[mid] <= i) lo = mid; else hi = mid - 1;
    }
    expert = lo;
    row0 = bounds[lo] + (i - tile_starts[lo]) * tile_m;
    rows = min(tile_m, bounds[lo + 1] - row0);
    col0 = blockIdx.y * tile_n;
    return true;
  }
};

// Element offset of (row, col) in a [rows][kMmaK] tile; col is a multiple of 8 (one
// 16-byte chunk). Rows are 64 bytes (4 chunks); the chunk is XORed with (row / 2) % 4, so
// the 8 rows an ldmatrix reads at one chunk fall in 8 distinct 16-byte bank groups.
__device__ __forceinline__ int swz(int row, int col) {
  return row * kMmaK + ((((col >> 3) ^ (row >> 1)) & 3) << 3);
}

// x [M, K], weight [E, N, K] contiguous with 16-byte aligned starts, K % 8 == 0;
// out [M, N] contiguous. Grid (row tiles bound, column tiles), kMmaThreads threads.
template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
    mma_kernel(const T* __restrict__ x, const T* __restrict__ weight,
               const int32_t* __restrict__ bounds, const int32_t* __restrict__ tile_starts,
               int E, int N, int K, T* __restrict__ out) {
  __shared__ __align__(128) T sA[2][kMmaM * kMmaK];
  __shared__ __align__(128) T sB[2][kMmaN * kMmaK];
  Tile t;
  if (!t.init(bounds, tile_starts, E, kMmaM, kMmaN)) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;  // the warp's 64 x 32 part of the tile
  const T* xa = x + int64_t(t.row0) * K;
  const T* wb = weight + (int64_t(t.expert) * N + t.col0) * K;

  // A (rows of x) and B (rows of weight[e]) of K step kt: 128 rows x 4 chunks each; rows
  // past the expert's end or past N are zero-filled.
  auto load = [&](int kt, int stage) {
    for (int c = tid; c < kMmaM * (kMmaK / 8); c += kMmaThreads) {
      const int r = c / (kMmaK / 8), col = (c % (kMmaK / 8)) * 8, k = kt * kMmaK + col;
      const bool a_ok = r < t.rows && k < K, b_ok = t.col0 + r < N && k < K;
      cp_async16(&sA[stage][swz(r, col)], a_ok ? xa + int64_t(r) * K + k : x, a_ok);
      cp_async16(&sB[stage][swz(r, col)], b_ok ? wb + int64_t(r) * K + k : weight, b_ok);
    }
  };

  float acc[4][4][4] = {};  // [m16 tile][n8 tile][mma accumulator]

  const int steps = (K + kMmaK - 1) / kMmaK;
  if (steps > 0) load(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < steps; ++kt) {
    cp_async_wait<0>();
    __syncthreads();  // step kt landed; every warp is done with the buffer loaded next
    if (kt + 1 < steps) load(kt + 1, (kt + 1) & 1);
    cp_async_commit();
    const T* a_s = sA[kt & 1];
    const T* b_s = sB[kt & 1];
#pragma unroll
    for (int kk = 0; kk < kMmaK / 16; ++kk) {
      uint32_t a[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int row = wm * 64 + mi * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        ldmatrix_x4(a[mi], a_s + swz(row, kk * 16 + (lane / 16) * 8));
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {  // 16 columns of weight rows per ldmatrix
        uint32_t b[4];
        const int col = wn * 32 + nj * 16 + (lane % 8) + (lane / 16) * 8;
        ldmatrix_x4(b, b_s + swz(col, kk * 16 + ((lane / 8) % 2) * 8));
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          mma16816<T>(acc[mi][2 * nj], a[mi], b[0], b[1]);
          mma16816<T>(acc[mi][2 * nj + 1], a[mi], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // The m16n8 accumulator layout: elements (lane / 4 (+ 8), (lane % 4) * 2 (+ 1)).
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = wm * 64 + mi * 16 + lane / 4 + half * 8;
        const int c = t.col0 + wn * 32 + ni * 8 + (lane % 4) * 2;
        if (r >= t.rows) continue;
        T* dst = out + int64_t(t.row0 + r) * N + c;
        const float v0 = acc[mi][ni][2 * half], v1 = acc[mi][ni][2 * half + 1];
        if (N % 2 == 0 && c + 1 < N) {  // an even N keeps (row, even c) 4-byte aligned
          *reinterpret_cast<uint32_t*>(dst) = pack2<T>(v0, v1);
        } else {
          if (c < N) dst[0] = round_to<T>(v0);
          if (c + 1 < N) dst[1] = round_to<T>(v1);
        }
      }
}

// x [M, K], weight [E, N, K], out [M, N], all contiguous, any K. Grid (row tiles bound,
// column tiles), kFmaThreads threads; thread (tr, tc) owns rows tr * 4.. and columns
// tc * 4.. of the 64 x 64 tile.
template <typename T>
__global__ void __launch_bounds__(kFmaThreads)
    fma_kernel(const T* __restrict__ x, const T* __restrict__ weight,
               const int32_t* __restrict__ bounds, const int32_t* __restrict__ tile_starts,
               int E, int N, int K, T* __restrict__ out) {
  // [k][row] and [k][column] in fp32; rows of 68 floats keep float4 reads aligned
  __shared__ __align__(16) float sA[kFmaK][kFmaM + 4];
  __shared__ __align__(16) float sB[kFmaK][kFmaN + 4];
  Tile t;
  if (!t.init(bounds, tile_starts, E, kFmaM, kFmaN)) return;
  static_assert(kFmaM == kFmaN && kFmaM * kFmaN == 16 * kFmaThreads, "4 x 4 per thread");
  const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
  const T* xa = x + int64_t(t.row0) * K;
  const T* wb = weight + (int64_t(t.expert) * N + t.col0) * K;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kFmaK) {
    for (int i = tid; i < kFmaM * kFmaK; i += kFmaThreads) {
      const int r = i / kFmaK, kk = i % kFmaK, k = k0 + kk;
      sA[kk][r] = r < t.rows && k < K ? to_float(xa[int64_t(r) * K + k]) : 0.f;
      sB[kk][r] = t.col0 + r < N && k < K ? to_float(wb[int64_t(r) * K + k]) : 0.f;
    }
    __syncthreads();
    const int kn = min(kFmaK, K - k0);
    for (int kk = 0; kk < kn; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&sA[kk][tr * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&sB[kk][tc * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();  // the next step overwrites the tiles
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = tr * 4 + i;
    if (r >= t.rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = t.col0 + tc * 4 + j;
      if (c < N) out[int64_t(t.row0 + r) * N + c] = round_to<T>(acc[i][j]);
    }
  }
}

}  // namespace gg
}  // namespace cuda
}  // namespace tokenspeed
