/*
 * The fused LM head's epilogue on gemm_sm90.cuh: the log-prob partials of logits =
 * hidden [T, H] x weight [V, H]^T, taken from the accumulators, so no logit ever leaves
 * the registers.
 *
 * A unit is one row tile over kHeadSplitTiles vocabulary tiles of 256 (1024 columns);
 * each thread folds the 64 columns of its two rows a tile holds into a running
 * (m, s, w, t), the quad's four states merge at the unit's end, and the unit's state goes
 * to state [T, splits] in logprobs.cuh's chunk convention (m and t in logit units), for
 * merge_states_kernel to merge a row's splits in order. The splits depend on V alone and
 * every product walks K in the same order, so a row's partials do not depend on T or on
 * the other rows (batch-invariant).
 */
#pragma once

#include <cstdint>

#include "cuda/fast_math.cuh"
#include "cuda/gemm_sm90.cuh"
#include "cuda/lp_state.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kHeadSplitTiles = 4;  // vocabulary tiles of a unit

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

struct HeadEpilogue {
  struct Params {
    int k_steps;          // ceil(H / kGemmK)
    int units;            // row_tiles * splits
    int64_t rows;         // T
    int64_t vocab;        // V, the columns of this weight (a shard's under TP)
    int row_tiles;        // ceil(T / kGemmRows)
    int vocab_tiles;      // ceil(V / kGemmCols)
    int splits;           // ceil(vocab_tiles / kHeadSplitTiles)
    const void* targets;  // [T] int32 or int64, global ids
    bool targets_int64;
    int64_t targets_stride;
    int64_t vocab_start;
    float inv_temp;
    float4* state;        // [T, splits]
  };

  __device__ __forceinline__ static GemmUnit unit(const Params& p, int u) {
    int row_tile, split;
    gemm_unit_coords(u, p.row_tiles, p.splits, row_tile, split);
    const int begin = split * kHeadSplitTiles;
    return {row_tile, begin, min(p.vocab_tiles, begin + kHeadSplitTiles)};
  }
  __device__ __forceinline__ static int b_row(const Params&, int tile, int half) {
    return tile * kGemmCols + half * kGemmBox;
  }

  int64_t row[2], tcol[2];  // the thread's rows; their targets' columns in this weight
  HeadRowState st[2];
  float t[2];
  int q2, lane;
  float c2;

  __device__ __forceinline__ HeadEpilogue(const Params& p, const GemmUnit& un,
                                          const GemmThread& me)
      : q2(2 * (me.lane % 4)), lane(me.lane), c2(p.inv_temp * 1.4426950408889634f) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row[h] = int64_t(un.row_tile) * kGemmRows + me.row_in_tile + 8 * h;
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
  }

  __device__ __forceinline__ void tile(const float (&d)[32][4], const Params& p, int v) {
    const int64_t col0 = int64_t(v) * kGemmCols;
    const int vcols = static_cast<int>(min(int64_t(kGemmCols), p.vocab - col0));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t rel = tcol[h] - col0;
      if (rel >= 0 && rel < vcols) head_take(d, h, static_cast<int>(rel) - q2, t[h]);
      if (vcols == kGemmCols)
        head_fold<false>(d, h, q2, vcols, c2, st[h]);
      else
        head_fold<true>(d, h, q2, vcols, c2, st[h]);
    }
  }

  // The quad's four column sets of each row, merged in a fixed butterfly.
  __device__ __forceinline__ void finish(const Params& p, const GemmUnit& un) {
    const int split = un.begin / kHeadSplitTiles;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      LpState acc{st[h].m, st[h].s, st[h].w * 0.6931471805599453f};
      float th = t[h];
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        const LpState o{__shfl_xor_sync(0xffffffffu, acc.m, off),
                        __shfl_xor_sync(0xffffffffu, acc.s, off),
                        __shfl_xor_sync(0xffffffffu, acc.w, off)};
        acc = merge_state(acc, o, p.inv_temp);
        th = fmaxf(th, __shfl_xor_sync(0xffffffffu, th, off));
      }
      if (lane % 4 == 0 && row[h] < p.rows)
        p.state[row[h] * p.splits + split] = make_float4(acc.m, acc.s, acc.w, th);
    }
  }
};

}  // namespace cuda
}  // namespace tokenspeed
