// CUDA host side of paged_prefill_attention: argument checks, device guard, output
// allocation, the kernel parameters, the choice of kernel (made here and nowhere else)
// and error reporting over the launch functions of launch.h (kernels in attention.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "cuda/host_utils.h"
#include "cuda/launch.h"
#include "op_checks.h"

namespace tokenspeed::cuda {
namespace {

// TOKENSPEED_ATTENTION_KERNEL=mma_sync runs the mma.sync kernel where the wgmma kernel
// would (tests and benchmarks compare the two).
bool mma_sync_forced() {
  const char* force = std::getenv("TOKENSPEED_ATTENTION_KERNEL");
  return force != nullptr && std::strcmp(force, "mma_sync") == 0;
}

// TOKENSPEED_ATTENTION_KV_LOAD=cp_async keeps the wgmma kernel's K/V loads on cp.async
// gathers; =tma requires TMA (the call fails where the page size rules it out); unset or
// any other value, TMA where the pages allow (launch.h). Tests and benchmarks compare them.
KvLoad kv_load() {
  const char* load = std::getenv("TOKENSPEED_ATTENTION_KV_LOAD");
  if (load == nullptr) return KvLoad::kAuto;
  if (std::strcmp(load, "cp_async") == 0) return KvLoad::kCpAsync;
  return std::strcmp(load, "tma") == 0 ? KvLoad::kTma : KvLoad::kAuto;
}

// Tiles of paged_attention_rows_per_tile() packed rows that cover the longest request:
// from max_seqlen_q, else from cu_seqlens_q read back.
int64_t row_tiles(const at::Tensor& cu, std::optional<int64_t> max_seqlen_q, int64_t n,
                  int64_t b, int group) {
  int64_t max_rows = 0;
  if (max_seqlen_q.has_value()) {
    max_rows = std::min<int64_t>(*max_seqlen_q, n);
  } else {
    const at::Tensor cu_host = cu.cpu();
    const int32_t* cu_h = cu_host.const_data_ptr<int32_t>();
    for (int64_t i = 0; i < b; ++i) max_rows = std::max<int64_t>(max_rows, cu_h[i + 1] - cu_h[i]);
  }
  const int64_t rows_per_tile = paged_attention_rows_per_tile();
  return (max_rows * group + rows_per_tile - 1) / rows_per_tile;
}

// Each token's request [n] int32 on q's device (the simple kernel's map), from
// cu_seqlens_q read back.
at::Tensor request_of_tokens(const at::Tensor& cu, int64_t n, int64_t b,
                             const c10::Device& device) {
  const at::Tensor cu_host = cu.cpu();
  const int32_t* cu_h = cu_host.const_data_ptr<int32_t>();
  std::vector<int32_t> req(n);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t t = cu_h[i]; t < cu_h[i + 1]; ++t) req[t] = static_cast<int32_t>(i);
  return at::from_blob(req.data(), {n}, at::TensorOptions().dtype(at::kInt)).to(device);
}

at::Tensor paged_prefill_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& page_table,
                                        const at::Tensor& cu_seqlens_q, const at::Tensor& kv_lens,
                                        std::optional<double> scale,
                                        std::optional<int64_t> max_seqlen_q, bool validate) {
  check_paged_attention(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, scale,
                        max_seqlen_q, validate);
  check_cuda(q, "q");
  const int64_t hq = q.size(1), d = q.size(2), hk = k_cache.size(2);
  const int64_t page_size = k_cache.size(1), b = page_table.size(0), n = q.size(0);
  const float sm_scale = attention_scale(scale, d);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({n, hq, d}, q.options());
  if (n == 0 || d == 0) return out;

  // q may be a view of a wider row (the engine's fused q/k/v projection): read in place
  // when its heads are contiguous and every row starts on a 16-byte boundary
  const bool q_in_place = q.stride(2) == 1 && q.stride(1) == d &&
                          aligned16(q) &&
                          (q.stride(0) * static_cast<int64_t>(q.element_size())) % 16 == 0;
  const at::Tensor qc = q_in_place ? q : q.contiguous();
  const at::Tensor cu = cu_seqlens_q.contiguous(), lens = kv_lens.contiguous();

  PagedAttnParams p{};
  p.q = qc.const_data_ptr();
  p.k_cache = k_cache.const_data_ptr();
  p.v_cache = v_cache.const_data_ptr();
  p.out = out.data_ptr();
  p.page_table = page_table.const_data_ptr<int32_t>();
  p.cu_seqlens = cu.const_data_ptr<int32_t>();
  p.kv_lens = lens.const_data_ptr<int32_t>();
  p.pt_stride = page_table.size(1) > 0 ? page_table.stride(0) : 0;
  p.q_stride = qc.stride(0);
  p.hq = static_cast<int>(hq);
  p.hk = static_cast<int>(hk);
  p.group = static_cast<int>(hq / hk);
  p.page_size = static_cast<int>(page_size);
  p.page_shift = (page_size & (page_size - 1)) == 0 ? __builtin_ctzll(page_size) : -1;
  p.scale_log2 = sm_scale * 1.4426950408889634f;
  p.head_dim = static_cast<int>(d);
  p.cache_slots = k_cache.size(0) * page_size;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DType dtype = dtype_of(q);

  // The kernel (launch.h says what each serves). The wgmma kernel serves a subset of the
  // mma.sync kernel's calls; the simple kernel serves the calls neither tiled kernel does.
  if (!paged_attention_mma_supports(dtype, p.head_dim)) {
    TS_CHECK(paged_attention_simple_supports(dtype, p.head_dim),
             "paged_prefill_attention on CUDA supports head dims up to ",
             kPagedAttentionSimpleMaxDim, ", got ", d);
    const at::Tensor req_of = request_of_tokens(cu, n, b, q.device());
    C10_CUDA_CHECK(launch_paged_attention_simple(p, dtype, req_of.const_data_ptr<int32_t>(), n,
                                                 stream));
    return out;
  }
  // The tiled kernels' grid covers the longest request.
  const int64_t tiles = row_tiles(cu, max_seqlen_q, n, b, p.group);
  TS_CHECK(tiles <= 65535 && b <= 65535 && hk <= 65535,
           "paged_prefill_attention: batch too large for one launch");
  if (tiles == 0) return out;
  // the wgmma kernel numbers its work items with an int
  const bool wgmma = hk * tiles * b <= std::numeric_limits<int>::max() && !mma_sync_forced() &&
                     paged_attention_wgmma_supports(dtype, p.head_dim);
  if (wgmma) {
    // its scheduler's plan (launch.h), from the caching allocator
    at::Tensor plan = at::empty({b + 2}, q.options().dtype(at::kInt));
    C10_CUDA_CHECK(launch_paged_attention_wgmma(p, dtype, static_cast<int>(b),
                                                static_cast<int>(tiles), kv_load(),
                                                plan.mutable_data_ptr<int32_t>(), stream));
  } else {
    C10_CUDA_CHECK(launch_paged_attention_mma(p, dtype, static_cast<int>(b),
                                              static_cast<int>(tiles), stream));
  }
  return out;
}

}  // namespace
}  // namespace tokenspeed::cuda

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) {
  m.impl("paged_prefill_attention", &tokenspeed::cuda::paged_prefill_attention_cuda);
}
