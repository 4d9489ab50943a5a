// CUDA launcher of store_kv (kernel in kv_cache.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kv_cache.cuh"
#include "op_checks.h"

namespace tokenspeed::cuda {
namespace {

void store_kv_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_store_kv(k, v, k_cache, v_cache, slot_mapping);
  TORCH_CHECK(k.is_cuda(), "k must be a CUDA tensor, got device ", k.device());
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t n = k.size(0);
  const int64_t row_bytes = k.size(1) * k.size(2) * static_cast<int64_t>(k.element_size());
  if (n == 0 || row_bytes == 0) return;
  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  auto launch = [&](auto unit) {
    using unit_t = decltype(unit);
    const int64_t row_units = row_bytes / static_cast<int64_t>(sizeof(unit_t));
    const int64_t total = n * row_units;
    const auto blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
    store_kv_kernel<unit_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const unit_t*>(kc.const_data_ptr()),
        static_cast<const unit_t*>(vc.const_data_ptr()),
        static_cast<unit_t*>(k_cache.data_ptr()), static_cast<unit_t*>(v_cache.data_ptr()),
        slots.const_data_ptr<int64_t>(), n, row_units);
  };
  // 16-byte units when every row (and so every base) allows it; caching allocators
  // return 16-byte aligned storage, views with an offset may not be.
  const auto aligned = [&](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  };
  if (row_bytes % 16 == 0 && aligned(kc) && aligned(vc) && aligned(k_cache) && aligned(v_cache))
    launch(uint4{});
  else
    launch(uint16_t{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace tokenspeed::cuda

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) {
  m.impl("store_kv", &tokenspeed::cuda::store_kv_cuda);
}
