// Launcher of store_kv (kernel in kv_cache.cuh) behind the plain interface of launch.h.
#include "cuda/kv_cache.cuh"
#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {

cudaError_t launch_store_kv(const void* k, const void* v, void* k_cache, void* v_cache,
                            const int64_t* slots, int64_t n, int64_t row_bytes, bool vec16,
                            cudaStream_t stream) {
  constexpr int kThreads = 256;
  auto launch = [&](auto unit) {
    using unit_t = decltype(unit);
    const int64_t row_units = row_bytes / static_cast<int64_t>(sizeof(unit_t));
    const int64_t total = n * row_units;
    const auto blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
    store_kv_kernel<unit_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const unit_t*>(k), static_cast<const unit_t*>(v),
        static_cast<unit_t*>(k_cache), static_cast<unit_t*>(v_cache), slots, n, row_units);
  };
  if (vec16)
    launch(uint4{});
  else
    launch(uint16_t{});
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tokenspeed
