// CUDA host side of store_kv: argument checks, device guard, the choice between reading
// k and v in place and copying them first, the choice of 16-byte or 2-byte units, and
// error reporting over launch_store_kv (launch.h; kernel in kv_cache.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/host_utils.h"
#include "cuda/launch.h"
#include "op_checks.h"

namespace tokenspeed::cuda {
namespace {

void store_kv_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slot_mapping, bool validate) {
  check_store_kv(k, v, k_cache, v_cache, slot_mapping, validate);
  check_cuda(k, "k");
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t n = k.size(0);
  const int64_t row_bytes = k.size(1) * k.size(2) * static_cast<int64_t>(k.element_size());
  if (n == 0 || row_bytes == 0) return;
  // k and v may be views of a wider row (the engine's fused q/k/v projection): read in
  // place when a token's heads are contiguous, else copied first
  const auto rows_in_place = [](const at::Tensor& t) {
    return t.stride(2) == 1 && (t.size(1) == 1 || t.stride(1) == t.size(2));
  };
  const at::Tensor kc = rows_in_place(k) ? k : k.contiguous();
  const at::Tensor vc = rows_in_place(v) ? v : v.contiguous();
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t esize = static_cast<int64_t>(k.element_size());
  const int64_t k_stride = kc.stride(0) * esize, v_stride = vc.stride(0) * esize;
  // 16-byte units when every row (and so every base) allows it
  const bool vec16 = row_bytes % 16 == 0 && k_stride % 16 == 0 && v_stride % 16 == 0 &&
                     aligned16(kc) && aligned16(vc) && aligned16(k_cache) && aligned16(v_cache);
  C10_CUDA_CHECK(launch_store_kv(kc.const_data_ptr(), vc.const_data_ptr(), k_cache.data_ptr(),
                                 v_cache.data_ptr(), slots.const_data_ptr(),
                                 slots.scalar_type() == at::kLong, n, row_bytes, k_stride,
                                 v_stride, vec16, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace tokenspeed::cuda

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) {
  m.impl("store_kv", &tokenspeed::cuda::store_kv_cuda);
}
