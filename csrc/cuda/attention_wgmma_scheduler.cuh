/*
 * The tile scheduler of the persistent wgmma attention kernel: which work items a block
 * takes, in which order.
 *
 * Work items are (kv head, request, tile of kRowsM packed query rows). A plan kernel
 * numbers the valid ones densely, request by request (Sm90Plan); within a request, the
 * last (longest) tile's items first, kv head fastest. Blocks take items dynamically: block
 * i starts with item i, then each claims the next unclaimed one from a global counter
 * when it starts an item (one ahead, so the atomic's round trip overlaps the item's
 * loads). A block that draws a short item simply draws again sooner, so ragged batches
 * (requests of different lengths and cached prefixes) stay balanced to about one item,
 * where a static assignment left 9-13% of the blocks' time idle (bench/NOTES.md); and
 * request by request, the blocks running together read the K/V of a few requests, which
 * then comes from L2. The order changes which block computes an item, never how: a
 * request's result does not depend on it.
 */
#pragma once

#include <cub/block/block_scan.cuh>

#include "cuda/attention_tile.cuh"
#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {

// The plan in global memory, [batch + 2] int32: first[b] (b = 0 .. batch) is the number
// of items of the requests before b, so first[batch] is the total; then the counter
// blocks claim items from. Written by sm90_plan_kernel before each launch.
struct Sm90Plan {
  const int* first;
  int* counter;
};

constexpr int kSm90PlanThreads = 1024;

// One block: each request's items (hk x its row tiles, at most tiles_per_request of them,
// the launch's grid bound), summed into plan.first; the counter zeroed.
__global__ void __launch_bounds__(kSm90PlanThreads)
    sm90_plan_kernel(const int32_t* cu_seqlens, int batch, int hk, int group,
                     int tiles_per_request, int* first, int* counter) {
  using Scan = cub::BlockScan<int, kSm90PlanThreads>;
  __shared__ typename Scan::TempStorage scan;
  int carry = 0;
  for (int base = 0; base < batch; base += kSm90PlanThreads) {
    const int b = base + threadIdx.x;
    int items = 0;
    if (b < batch) {
      const int64_t rows = int64_t(cu_seqlens[b + 1] - cu_seqlens[b]) * group;
      const int64_t tiles = min((rows + kRowsM - 1) / kRowsM, int64_t(tiles_per_request));
      items = hk * static_cast<int>(tiles);
    }
    int before, total;
    Scan(scan).ExclusiveSum(items, before, total);
    if (b < batch) first[b] = carry + before;
    carry += total;  // <= hk x tiles_per_request x batch < 2^31 (the host checks)
    __syncthreads();  // before the scan's storage is reused
  }
  if (threadIdx.x == 0) {
    first[batch] = carry;
    *counter = 0;
  }
}

class Sm90TileScheduler {
 public:
  __device__ __forceinline__ Sm90TileScheduler(Sm90Plan plan, int batch)
      : plan_(plan), batch_(batch), next_(blockIdx.x) {}

  // The block's next item, into t; false past the last one. By one thread.
  __device__ __forceinline__ bool next(const PagedAttnParams& p, RowTile& t) {
    const int n = next_;
    if (n >= __ldg(plan_.first + batch_)) return false;
    next_ = atomicAdd(plan_.counter, 1) + static_cast<int>(gridDim.x);
    // the request: the last whose items start at or before n (requests without new tokens
    // have none and share their successor's start)
    int lo = 0, hi = batch_ - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (__ldg(plan_.first + mid) <= n) lo = mid; else hi = mid - 1;
    }
    const int start = __ldg(plan_.first + lo);
    const int tiles = (__ldg(plan_.first + lo + 1) - start) / p.hk;
    const int in_request = n - start;
    return t.init(p, kRowsM, in_request % p.hk, tiles - 1 - in_request / p.hk, lo);
  }

 private:
  Sm90Plan plan_;
  int batch_;
  int next_;  // the block's next item: claimed, not yet taken
};

}  // namespace cuda
}  // namespace tokenspeed
