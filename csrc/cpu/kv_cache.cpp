// CPU store_kv: copies each new token's K and V rows [Hk, D] into its flat cache slot
// (page * page_size + offset) of the contiguous caches [P, page_size, Hk, D]. Writes only
// the slots named in slot_mapping; a negative slot (a padding token) is skipped. Parallel
// over tokens; each token is two memcpy's of Hk * D elements.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "op_checks.h"

namespace tokenspeed::cpu {
namespace {

void store_kv_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                  at::Tensor& v_cache, const at::Tensor& slot_mapping, bool validate) {
  check_store_kv(k, v, k_cache, v_cache, slot_mapping, validate);
  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t n = k.size(0);
  const int64_t row_bytes = k.size(1) * k.size(2) * static_cast<int64_t>(k.element_size());
  const auto* k_src = static_cast<const char*>(kc.const_data_ptr());
  const auto* v_src = static_cast<const char*>(vc.const_data_ptr());
  auto* k_dst = static_cast<char*>(k_cache.data_ptr());
  auto* v_dst = static_cast<char*>(v_cache.data_ptr());
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (slot[i] < 0) continue;
      std::memcpy(k_dst + slot[i] * row_bytes, k_src + i * row_bytes, row_bytes);
      std::memcpy(v_dst + slot[i] * row_bytes, v_src + i * row_bytes, row_bytes);
    }
  });
}

}  // namespace
}  // namespace tokenspeed::cpu

TORCH_LIBRARY_IMPL(tokenspeed, CPU, m) {
  m.impl("store_kv", &tokenspeed::cpu::store_kv_cpu);
}
