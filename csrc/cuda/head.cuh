/*
 * head_partials_kernel: the log-prob partials of logits = hidden [T, H] x weight [V, H]^T,
 * taken in the epilogue of the GEMM itself, so no logit ever leaves the registers.
 *
 * Tiles: 128 rows x 256 vocabulary columns, K in steps of 64 (one 128-byte swizzle row of
 * 16-bit elements). A unit of work is one row tile over kHeadSplitTiles vocabulary tiles
 * (1024 columns); its (m, s, w, t) state, in logprobs.cuh's chunk convention (m and t in
 * logit units), goes to state [T, splits], and merge_states_kernel merges a row's splits in
 * order. The splits depend on V alone and every product walks K in the same order, so a
 * row's partials do not depend on T or on the other rows (batch-invariant).
 *
 * Roles (384 threads, one block per SM, persistent over the units):
 * - producer warpgroup: one thread issues the TMA loads of each stage (A: the unit's 128
 *   rows x 64, B: 256 vocabulary rows x 64, both 128-byte swizzled, zero-filled past T, V
 *   and H) onto the stage's "full" mbarrier, after its "empty" one says both consumers
 *   are done with the stage's previous fill;
 * - two consumer warpgroups, rows 0..63 and 64..127 of every tile: per K step four
 *   m64n256k16 wgmmas from shared memory into 128 fp32 accumulators a thread, one group
 *   kept in flight; at a tile's end the epilogue folds the tile into each row's running
 *   state. The consumers take turns at the epilogue (two named barriers), so one runs its
 *   exponentials while the other's wgmmas keep the tensor cores busy.
 *
 * Units are numbered with the row tile fastest inside groups of kHeadRowGroup row tiles:
 * the blocks running at once share those rows' A tiles and a few vocabulary splits' B
 * tiles in L2, and the weight is read from DRAM once per row group.
 */
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/fast_math.cuh"
#include "cuda/lp_state.cuh"
#include "cuda/pipeline.cuh"
#include "cuda/wgmma.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kHeadRows = 128;       // a tile's rows: 64 per consumer warpgroup
constexpr int kHeadCols = 256;       // a tile's vocabulary columns (one m64n256 wgmma)
constexpr int kHeadK = 64;           // K step: 128 bytes of 16-bit elements
constexpr int kHeadStages = 4;
constexpr int kHeadSplitTiles = 4;   // vocabulary tiles of a unit
constexpr int kHeadRowGroup = 16;    // row tiles whose units are numbered together
constexpr int kHeadThreads = 384;    // producer + two consumer warpgroups
constexpr int kHeadConsumerThreads = 256;
constexpr int kHeadConsumerWarps = 8;
constexpr int kHeadABytes = kHeadRows * kHeadK * 2;
constexpr int kHeadBBytes = kHeadCols * kHeadK * 2;
constexpr int kHeadStageBytes = kHeadABytes + kHeadBBytes;
// stages, their full and empty barriers, and slack to align the stages to 1024 bytes
constexpr int kHeadSmemBytes = kHeadStages * kHeadStageBytes + 2 * kHeadStages * 8 + 1024;
// 128 x 40 + 256 x 232 <= 64K registers
constexpr int kHeadProducerRegs = 40, kHeadConsumerRegs = 232;
// named barriers 1 and 2: consumer warpgroup 0's and 1's turn at the epilogue
constexpr int kHeadTurnBarrier = 1;

struct HeadParams {
  int64_t rows;         // T
  int64_t vocab;        // V, the columns of this weight (a shard's under TP)
  int k_steps;          // ceil(H / kHeadK)
  int row_tiles;        // ceil(T / kHeadRows)
  int vocab_tiles;      // ceil(V / kHeadCols)
  int splits;           // ceil(vocab_tiles / kHeadSplitTiles)
  const void* targets;  // [T] int32 or int64, global ids
  bool targets_int64;
  int64_t targets_stride;
  int64_t vocab_start;
  float inv_temp;
  float4* state;        // [T, splits]
};

struct HeadUnit {
  int row_tile, split;
};

__device__ __forceinline__ HeadUnit head_unit(const HeadParams& p, int u) {
  const int per_group = kHeadRowGroup * p.splits;  // every group but the last is full
  const int group = u / per_group, rem = u - group * per_group;
  const int first = group * kHeadRowGroup;
  const int n = min(kHeadRowGroup, p.row_tiles - first);
  return {first + rem % n, rem / n};
}

// A thread's running state of one row over the columns it holds: m the max logit,
// s = sum 2^d and w = sum 2^d d with d = (logit - m) * inv_temp * log2(e).
struct HeadRowState {
  float m, s, w;
};

// Folds half h (row lane / 4 + 8h) of a 64 x 256 accumulator tile into st. Column
// 8i + q2 + e of the tile sits in d[i][2h + e]; with kTail, columns from vcols on lie past
// V and count for nothing.
template <bool kTail>
__device__ __forceinline__ void head_fold(const float (&d)[32][4], int h, int q2, int vcols,
                                          float c2, HeadRowState& st) {
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < 32; ++i)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (!kTail || 8 * i + q2 + e < vcols) mx = fmaxf(mx, d[i][2 * h + e]);
  if (mx == -INFINITY) return;
  if (mx > st.m) {
    if (st.m != -INFINITY) {
      const float dl = (st.m - mx) * c2, a = exp2_ftz(dl);
      st.w = a * fmaf(st.s, dl, st.w);
      st.s *= a;
    }
    st.m = mx;
  }
  float s0 = 0.f, s1 = 0.f, w0 = 0.f, w1 = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    float d0 = (d[i][2 * h] - st.m) * c2, d1 = (d[i][2 * h + 1] - st.m) * c2;
    if constexpr (kTail) {  // 2^-1e30 = 0 and 0 * -1e30 = 0: the column adds nothing
      if (8 * i + q2 >= vcols) d0 = -1e30f;
      if (8 * i + q2 + 1 >= vcols) d1 = -1e30f;
    }
    const float p0 = exp2_ftz(d0), p1 = exp2_ftz(d1);
    s0 += p0;
    s1 += p1;
    w0 = fmaf(p0, d0, w0);
    w1 = fmaf(p1, d1, w1);
  }
  st.s += s0 + s1;
  st.w += w0 + w1;
}

// The logit of tile column q2 + rel in half h, if this thread holds it.
__device__ __forceinline__ void head_take(const float (&d)[32][4], int h, int rel, float& t) {
#pragma unroll
  for (int i = 0; i < 32; ++i)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (rel == 8 * i + e) t = d[i][2 * h + e];
}

__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar,
                                            int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(pipe::smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(pipe::smem_addr(bar))
      : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   pipe::smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

template <typename T>
__global__ void __launch_bounds__(kHeadThreads, 1)
    head_partials_kernel(const __grid_constant__ CUtensorMap map_a,
                         const __grid_constant__ CUtensorMap map_b, const HeadParams p) {
#ifdef TS_SM90A_DEVICE
  extern __shared__ uint8_t head_smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(head_smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kHeadStages * kHeadStageBytes);
  uint64_t* empty = full + kHeadStages;
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int i = 0; i < kHeadStages; ++i) {
      pipe::mbar_init(&full[i], 1);
      pipe::mbar_init(&empty[i], kHeadConsumerWarps);
    }
    pipe::fence_mbar_init();
  }
  __syncthreads();
  const int units = p.row_tiles * p.splits;

  if (tid < 128) {  // the producer
    pipe::setmaxnreg_dec<kHeadProducerRegs>();
    if (tid != 0) return;
    uint32_t g = 0;
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
      const HeadUnit un = head_unit(p, u);
      const int v_end = min(p.vocab_tiles, (un.split + 1) * kHeadSplitTiles);
      for (int v = un.split * kHeadSplitTiles; v < v_end; ++v)
        for (int k = 0; k < p.k_steps; ++k, ++g) {
          const int st = g % kHeadStages;
          pipe::mbar_wait(&empty[st], ((g / kHeadStages) & 1) ^ 1);
          mbar_arrive_expect_tx(&full[st], kHeadStageBytes);
          uint8_t* stage = smem + st * kHeadStageBytes;
          tma_load_2d(stage, &map_a, &full[st], k * kHeadK, un.row_tile * kHeadRows);
          tma_load_2d(stage + kHeadABytes, &map_b, &full[st], k * kHeadK, v * kHeadCols);
        }
    }
    return;
  }

  pipe::setmaxnreg_inc<kHeadConsumerRegs>();
  const int ctid = tid - 128, wg = ctid / 128, lane = tid % 32, q2 = 2 * (lane % 4);
  const int row_in_tile = wg * 64 + (ctid / 32 % 4) * 16 + lane / 4;
  const float c2 = p.inv_temp * 1.4426950408889634f;
  if (wg == 1) pipe::named_arrive(kHeadTurnBarrier, kHeadConsumerThreads);  // 0 goes first
  float d[32][4];
  uint32_t g = 0;
  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const HeadUnit un = head_unit(p, u);
    const bool last_unit = u + static_cast<int>(gridDim.x) >= units;
    int64_t row[2], tcol[2];
    HeadRowState st[2];
    float t[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row[h] = int64_t(un.row_tile) * kHeadRows + row_in_tile + 8 * h;
      tcol[h] = -1;
      if (row[h] < p.rows) {
        const int64_t at = row[h] * p.targets_stride;
        tcol[h] = (p.targets_int64 ? static_cast<const int64_t*>(p.targets)[at]
                                   : static_cast<const int32_t*>(p.targets)[at]) -
                  p.vocab_start;
      }
      st[h] = {-INFINITY, 0.f, 0.f};
      t[h] = -INFINITY;
    }
    const int v_end = min(p.vocab_tiles, (un.split + 1) * kHeadSplitTiles);
    for (int v = un.split * kHeadSplitTiles; v < v_end; ++v) {
      for (int k = 0; k < p.k_steps; ++k, ++g) {
        const int stg = g % kHeadStages;
        pipe::mbar_wait(&full[stg], (g / kHeadStages) & 1);
        const T* a = reinterpret_cast<const T*>(smem + stg * kHeadStageBytes) + wg * 64 * kHeadK;
        const T* b = reinterpret_cast<const T*>(smem + stg * kHeadStageBytes + kHeadABytes);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < kHeadK / 16; ++kk)
          wgmma::wgmma_ss_n256<T>(d, wgmma::sw128_desc(a + kk * 16, 16, 1024),
                                  wgmma::sw128_desc(b + kk * 16, 16, 1024), k > 0 || kk > 0);
        wgmma::commit();
        wgmma::wait<1>();  // the previous step's products are done: its stage is free
        if (k > 0 && lane == 0) pipe::mbar_arrive(&empty[(g - 1) % kHeadStages]);
      }
      wgmma::wait<0>();
      wgmma::fence_operand(d);
      if (lane == 0) pipe::mbar_arrive(&empty[(g - 1) % kHeadStages]);

      pipe::named_sync(kHeadTurnBarrier + wg, kHeadConsumerThreads);
      const int64_t col0 = int64_t(v) * kHeadCols;
      const int vcols = static_cast<int>(min(int64_t(kHeadCols), p.vocab - col0));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t rel = tcol[h] - col0;
        if (rel >= 0 && rel < vcols) head_take(d, h, static_cast<int>(rel) - q2, t[h]);
        if (vcols == kHeadCols)
          head_fold<false>(d, h, q2, vcols, c2, st[h]);
        else
          head_fold<true>(d, h, q2, vcols, c2, st[h]);
      }
      if (!(wg == 1 && last_unit && v + 1 == v_end))  // the last turn is taken by nobody
        pipe::named_arrive(kHeadTurnBarrier + 1 - wg, kHeadConsumerThreads);
    }
    // the quad's four column sets of each row, merged in a fixed butterfly
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      LpState acc{st[h].m, st[h].s, st[h].w * 0.6931471805599453f};
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        const LpState o{__shfl_xor_sync(0xffffffffu, acc.m, off),
                        __shfl_xor_sync(0xffffffffu, acc.s, off),
                        __shfl_xor_sync(0xffffffffu, acc.w, off)};
        acc = merge_state(acc, o, p.inv_temp);
        t[h] = fmaxf(t[h], __shfl_xor_sync(0xffffffffu, t[h], off));
      }
      if (lane % 4 == 0 && row[h] < p.rows)
        p.state[row[h] * p.splits + un.split] = make_float4(acc.m, acc.s, acc.w, t[h]);
    }
  }
#endif
}

}  // namespace cuda
}  // namespace tokenspeed
