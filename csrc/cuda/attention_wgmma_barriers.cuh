/*
 * Named barriers of the wgmma attention kernel (barrier 0 is __syncthreads). Each is
 * used by one set of threads, at the thread count given where it is used.
 */
#pragma once

#include "cuda/pipeline.cuh"

namespace tokenspeed {
namespace cuda {

enum class Sm90AttnBarrier : int {
  // The producer warpgroup: thread 0's description of the next item, to the others.
  kProducer = 1,
  // Consumer warpgroup 0's turn to issue its wgmmas (ping-pong); warpgroup 1's follows.
  kConsumerTurn0 = 2,
  kConsumerTurn1 = 3,
};
static_assert(static_cast<int>(Sm90AttnBarrier::kConsumerTurn1) ==
                  static_cast<int>(Sm90AttnBarrier::kConsumerTurn0) + 1,
              "consumer_turn numbers the turns from kConsumerTurn0");

// The barrier that gives consumer warpgroup c (0 or 1) its turn.
__device__ __forceinline__ Sm90AttnBarrier consumer_turn(int c) {
  return static_cast<Sm90AttnBarrier>(static_cast<int>(Sm90AttnBarrier::kConsumerTurn0) + c);
}

__device__ __forceinline__ void named_sync(Sm90AttnBarrier id, int threads) {
  pipe::named_sync(static_cast<int>(id), threads);
}
__device__ __forceinline__ void named_arrive(Sm90AttnBarrier id, int threads) {
  pipe::named_arrive(static_cast<int>(id), threads);
}

}  // namespace cuda
}  // namespace tokenspeed
