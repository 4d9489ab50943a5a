// Launcher of store_kv (kernel in kv_cache.cuh) behind the plain interface of launch.h.
#include <type_traits>

#include "cuda/kv_cache.cuh"
#include "cuda/launch.h"

namespace tokenspeed {
namespace cuda {

cudaError_t launch_store_kv(const void* k, const void* v, void* k_cache, void* v_cache,
                            const void* slots, bool slots_int64, int64_t n, int64_t row_bytes,
                            int64_t k_stride_bytes, int64_t v_stride_bytes, bool vec16,
                            cudaStream_t stream) {
  constexpr int kThreads = 256;
  auto launch = [&](auto unit, const auto* slot) {
    using unit_t = decltype(unit);
    using slot_t = std::remove_cv_t<std::remove_pointer_t<decltype(slot)>>;
    const auto size = static_cast<int64_t>(sizeof(unit_t));
    const int64_t row_units = row_bytes / size;
    const int64_t total = n * row_units;
    const auto blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
    store_kv_kernel<unit_t, slot_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const unit_t*>(k), static_cast<const unit_t*>(v),
        static_cast<unit_t*>(k_cache), static_cast<unit_t*>(v_cache), slot, n, row_units,
        k_stride_bytes / size, v_stride_bytes / size);
  };
  auto with_slots = [&](auto unit) {
    if (slots_int64)
      launch(unit, static_cast<const int64_t*>(slots));
    else
      launch(unit, static_cast<const int32_t*>(slots));
  };
  if (vec16)
    with_slots(uint4{});
  else
    with_slots(uint16_t{});
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tokenspeed
