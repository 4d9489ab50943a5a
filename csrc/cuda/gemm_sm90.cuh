/*
 * A persistent sm_90a GEMM whose epilogue is the caller's: work on the fp32 accumulator
 * tiles of A [M, K] x B^T in registers, the product itself never stored. The fused LM
 * head (head.cuh) is its epilogue.
 *
 * Tiles: 128 rows of A x 256 rows of B (two 128-row boxes whose first rows the epilogue
 * names), K in steps of 64 (one 128-byte swizzle row of 16-bit elements), four stages.
 *
 * Roles (384 threads, one block per SM, units of work strided over the blocks):
 * - producer warpgroup: one thread issues the TMA loads of each stage onto its "full"
 *   mbarrier, once its "empty" one says both consumers are done with the stage's previous
 *   fill. Reads past M, past B's rows and past K give zeros;
 * - two consumer warpgroups, rows 0..63 and 64..127 of every tile: per K step four
 *   m64n256k16 wgmmas from shared memory into 128 fp32 accumulators a thread, one group
 *   kept in flight; at a tile's end the epilogue gets the accumulators. The consumers
 *   take turns at the epilogue (two named barriers), so one's epilogue overlaps the
 *   other's products on the tensor cores.
 *
 * A unit is one row tile over a run of column tiles [begin, end); the epilogue object is
 * made at the unit's start, sees each tile, and finishes the unit. Every wgmma and wait
 * lies on a path all warps of the warpgroup take (ptxas serialises the wgmmas otherwise).
 *
 * The epilogue type E provides: E::Params (with k_steps and units), E::unit(p, u) ->
 * GemmUnit, E::b_row(p, tile, half) -> the first B row of that 128-row box, a constructor
 * E(p, unit, GemmThread), tile(d, p, tile) and finish(p, unit).
 */
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/pipeline.cuh"
#include "cuda/wgmma.cuh"

namespace tokenspeed {
namespace cuda {

constexpr int kGemmRows = 128;       // a tile's A rows: 64 per consumer warpgroup
constexpr int kGemmCols = 256;       // a tile's B rows (one m64n256 wgmma)
constexpr int kGemmBox = 128;        // rows of one TMA box
constexpr int kGemmK = 64;           // K step: 128 bytes of 16-bit elements
constexpr int kGemmStages = 4;
constexpr int kGemmRowGroup = 16;    // row tiles whose units are numbered together
constexpr int kGemmThreads = 384;    // producer + two consumer warpgroups
constexpr int kGemmConsumerThreads = 256;
constexpr int kGemmConsumerWarps = 8;
constexpr int kGemmABytes = kGemmRows * kGemmK * 2;
constexpr int kGemmBoxBytes = kGemmBox * kGemmK * 2;
constexpr int kGemmStageBytes = kGemmABytes + 2 * kGemmBoxBytes;
// stages, their full and empty barriers, and slack to align the stages to 1024 bytes
constexpr int kGemmSmemBytes = kGemmStages * kGemmStageBytes + 2 * kGemmStages * 8 + 1024;
// 128 x 40 + 256 x 232 <= 64K registers
constexpr int kGemmProducerRegs = 40, kGemmConsumerRegs = 232;
// named barriers 1 and 2: consumer warpgroup 0's and 1's turn at the epilogue
constexpr int kGemmTurnBarrier = 1;

// Where a consumer thread sits: its warpgroup, its lane and its first row in the tile
// (the m64nN accumulator layout's lane / 4 of its warp's 16 rows; the second is 8 below).
struct GemmThread {
  int wg, lane, row_in_tile;
};

struct GemmUnit {
  int row_tile, begin, end;  // column tiles [begin, end)
};

// Unit u of row_tiles x col_groups units, the row tile fastest within groups of
// kGemmRowGroup row tiles: the blocks running at once share those rows' A tiles and a few
// column groups' B tiles in L2, and B is read from DRAM once per row group.
__device__ __forceinline__ void gemm_unit_coords(int u, int row_tiles, int col_groups,
                                                 int& row_tile, int& col_group) {
  const int per_group = kGemmRowGroup * col_groups;  // every group but the last is full
  const int group = u / per_group, rem = u - group * per_group;
  const int first = group * kGemmRowGroup;
  const int n = min(kGemmRowGroup, row_tiles - first);
  row_tile = first + rem % n;
  col_group = rem / n;
}

template <typename T, typename E>
__global__ void __launch_bounds__(kGemmThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap map_a,
                     const __grid_constant__ CUtensorMap map_b, const typename E::Params p) {
#ifdef TS_SM90A_DEVICE
  extern __shared__ uint8_t gemm_smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(gemm_smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kGemmStages * kGemmStageBytes);
  uint64_t* empty = full + kGemmStages;
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int i = 0; i < kGemmStages; ++i) {
      pipe::mbar_init(&full[i], 1);
      pipe::mbar_init(&empty[i], kGemmConsumerWarps);
    }
    pipe::fence_mbar_init();
  }
  __syncthreads();

  if (tid < 128) {  // the producer
    pipe::setmaxnreg_dec<kGemmProducerRegs>();
    if (tid != 0) return;
    uint32_t g = 0;
    for (int u = blockIdx.x; u < p.units; u += gridDim.x) {
      const GemmUnit un = E::unit(p, u);
      for (int v = un.begin; v < un.end; ++v)
        for (int k = 0; k < p.k_steps; ++k, ++g) {
          const int st = g % kGemmStages;
          pipe::mbar_wait(&empty[st], ((g / kGemmStages) & 1) ^ 1);
          pipe::mbar_arrive_expect_tx(&full[st], kGemmStageBytes);
          uint8_t* stage = smem + st * kGemmStageBytes;
          pipe::tma_load_2d(stage, &map_a, &full[st], k * kGemmK, un.row_tile * kGemmRows);
          pipe::tma_load_2d(stage + kGemmABytes, &map_b, &full[st], k * kGemmK,
                            E::b_row(p, v, 0));
          pipe::tma_load_2d(stage + kGemmABytes + kGemmBoxBytes, &map_b, &full[st],
                            k * kGemmK, E::b_row(p, v, 1));
        }
    }
    return;
  }

  pipe::setmaxnreg_inc<kGemmConsumerRegs>();
  const int ctid = tid - 128, wg = ctid / 128, lane = tid % 32;
  const GemmThread me{wg, lane, wg * 64 + (ctid / 32 % 4) * 16 + lane / 4};
  if (wg == 1) pipe::named_arrive(kGemmTurnBarrier, kGemmConsumerThreads);  // 0 goes first
  float d[32][4];
  uint32_t g = 0;
  for (int u = blockIdx.x; u < p.units; u += gridDim.x) {
    const GemmUnit un = E::unit(p, u);
    const bool last_unit = u + static_cast<int>(gridDim.x) >= p.units;
    E epi(p, un, me);
    for (int v = un.begin; v < un.end; ++v) {
      for (int k = 0; k < p.k_steps; ++k, ++g) {
        const int stg = g % kGemmStages;
        pipe::mbar_wait(&full[stg], (g / kGemmStages) & 1);
        const T* a = reinterpret_cast<const T*>(smem + stg * kGemmStageBytes) + wg * 64 * kGemmK;
        const T* b = reinterpret_cast<const T*>(smem + stg * kGemmStageBytes + kGemmABytes);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < kGemmK / 16; ++kk)
          wgmma::wgmma_ss_n256<T>(d, wgmma::sw128_desc(a + kk * 16, 16, 1024),
                                  wgmma::sw128_desc(b + kk * 16, 16, 1024), k > 0 || kk > 0);
        wgmma::commit();
        wgmma::wait<1>();  // the previous step's products are done: its stage is free
        if (k > 0 && lane == 0) pipe::mbar_arrive(&empty[(g - 1) % kGemmStages]);
      }
      wgmma::wait<0>();
      wgmma::fence_operand(d);
      if (lane == 0) pipe::mbar_arrive(&empty[(g - 1) % kGemmStages]);

      pipe::named_sync(kGemmTurnBarrier + wg, kGemmConsumerThreads);
      epi.tile(d, p, v);
      if (!(wg == 1 && last_unit && v + 1 == un.end))  // the last turn is taken by nobody
        pipe::named_arrive(kGemmTurnBarrier + 1 - wg, kGemmConsumerThreads);
    }
    epi.finish(p, un);
  }
#endif
}

}  // namespace cuda
}  // namespace tokenspeed
