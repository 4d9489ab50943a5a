/*
 * The persistent tile scheduler of the wgmma attention kernel: which work items a block
 * takes, in which order.
 *
 * Work items are (kv head, request, tile of kRowsM packed query rows), hk x batch x tiles
 * of them, numbered kv head fastest, then the request, then the tile, longest first
 * (every request's last tile, then the ones before). Round r gives block i item
 * r * gridDim.x + i, or r * gridDim.x + gridDim.x - 1 - i in odd rounds (snake order):
 * the items come longest first, so this evens out the blocks' sums. Items past their
 * request are skipped.
 */
#pragma once

#include "cuda/attention_tile.cuh"
#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {

class Sm90TileScheduler {
 public:
  __device__ __forceinline__ Sm90TileScheduler(const PagedAttnParams& p, int tiles_per_request,
                                                int batch)
      : num_items_(p.hk * tiles_per_request * batch),
        tiles_(tiles_per_request),
        batch_(batch),
        next_(blockIdx.x),
        step_(2 * (gridDim.x - blockIdx.x) - 1) {}

  // The block's next item that holds rows, into t; false past its last one.
  __device__ __forceinline__ bool next(const PagedAttnParams& p, RowTile& t) {
    bool valid = false;
    while (next_ < num_items_ && !valid) {
      const int rest = next_ / p.hk;
      valid = t.init(p, kRowsM, next_ % p.hk, tiles_ - 1 - rest / batch_, rest % batch_);
      // the steps alternate between 2 (gridDim.x - i) - 1 and 2 i + 1
      next_ += step_;
      step_ = 2 * gridDim.x - step_;
    }
    return valid;
  }

 private:
  int num_items_, tiles_, batch_;
  int next_, step_;  // the next item to try, and the step after it
};

}  // namespace cuda
}  // namespace tokenspeed
