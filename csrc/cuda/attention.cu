// CUDA launcher of paged_prefill_attention (kernels in attention.cuh): the tensor-core
// kernel for bf16/fp16 with head dim 64 or 128, the simple kernel otherwise.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cuda/attention.cuh"
#include "op_checks.h"

namespace tokenspeed::cuda {
namespace {

constexpr int kSimpleMaxDim = 256;

template <typename T, int D>
void launch_mma(const PagedAttnParams& p, int b, int max_tiles, cudaStream_t stream) {
  constexpr int smem = paged_attention_smem_bytes<D>();
  auto* kernel = &paged_attention_mma_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(static_cast<unsigned>(p.hk), static_cast<unsigned>(max_tiles),
                  static_cast<unsigned>(b));
  kernel<<<grid, kAttnThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_simple(const PagedAttnParams& p, const at::Tensor& req_of, int64_t n,
                   cudaStream_t stream) {
  constexpr int kThreads = 128;
  const int64_t warps = n * p.hq;
  const auto blocks = static_cast<unsigned>((warps * 32 + kThreads - 1) / kThreads);
  paged_attention_simple_kernel<T, kSimpleMaxDim / 32><<<blocks, kThreads, 0, stream>>>(
      p, req_of.const_data_ptr<int32_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor paged_prefill_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& page_table,
                                        const at::Tensor& cu_seqlens_q, const at::Tensor& kv_lens,
                                        std::optional<double> scale) {
  check_paged_attention(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens);
  check_attention_scale(scale);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  const int64_t hq = q.size(1), d = q.size(2), hk = k_cache.size(2);
  const int64_t page_size = k_cache.size(1), b = page_table.size(0), n = q.size(0);
  const float sm_scale = static_cast<float>(scale.has_value() ? *scale
                                                              : 1.0 / std::sqrt(double(d)));
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({n, hq, d}, q.options());
  if (n == 0 || d == 0) return out;

  const at::Tensor qc = q.contiguous();
  const at::Tensor cu = cu_seqlens_q.contiguous(), lens = kv_lens.contiguous();
  const at::Tensor cu_host = cu.cpu();
  const int32_t* cu_h = cu_host.const_data_ptr<int32_t>();

  PagedAttnParams p{};
  p.q = qc.const_data_ptr();
  p.k_cache = k_cache.const_data_ptr();
  p.v_cache = v_cache.const_data_ptr();
  p.out = out.data_ptr();
  p.page_table = page_table.const_data_ptr<int32_t>();
  p.cu_seqlens = cu.const_data_ptr<int32_t>();
  p.kv_lens = lens.const_data_ptr<int32_t>();
  p.pt_stride = page_table.size(1) > 0 ? page_table.stride(0) : 0;
  p.hq = static_cast<int>(hq);
  p.hk = static_cast<int>(hk);
  p.group = static_cast<int>(hq / hk);
  p.page_size = static_cast<int>(page_size);
  p.page_shift = (page_size & (page_size - 1)) == 0 ? __builtin_ctzll(page_size) : -1;
  p.scale_log2 = sm_scale * 1.4426950408889634f;
  p.head_dim = static_cast<int>(d);
  auto stream = c10::cuda::getCurrentCUDAStream();

  const bool half_type = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
  if (half_type && (d == 64 || d == 128)) {
    int64_t max_rows = 0;
    for (int64_t i = 0; i < b; ++i) max_rows = std::max<int64_t>(max_rows, cu_h[i + 1] - cu_h[i]);
    const int64_t max_tiles = (max_rows * p.group + kRowsM - 1) / kRowsM;
    TORCH_CHECK(max_tiles <= 65535 && b <= 65535 && hk <= 65535,
                "paged_prefill_attention: batch too large for one launch");
    if (max_tiles == 0) return out;
    const bool bf16 = q.scalar_type() == at::kBFloat16;
    if (d == 64)
      bf16 ? launch_mma<__nv_bfloat16, 64>(p, b, max_tiles, stream)
           : launch_mma<__half, 64>(p, b, max_tiles, stream);
    else
      bf16 ? launch_mma<__nv_bfloat16, 128>(p, b, max_tiles, stream)
           : launch_mma<__half, 128>(p, b, max_tiles, stream);
    return out;
  }

  TORCH_CHECK(d <= kSimpleMaxDim, "paged_prefill_attention on CUDA supports head dims up to ",
              kSimpleMaxDim, ", got ", d);
  std::vector<int32_t> req(n);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t t = cu_h[i]; t < cu_h[i + 1]; ++t) req[t] = static_cast<int32_t>(i);
  const at::Tensor req_of =
      at::from_blob(req.data(), {n}, at::TensorOptions().dtype(at::kInt)).to(q.device());
  switch (q.scalar_type()) {
    case at::kBFloat16: launch_simple<__nv_bfloat16>(p, req_of, n, stream); break;
    case at::kHalf: launch_simple<__half>(p, req_of, n, stream); break;
    default: launch_simple<float>(p, req_of, n, stream); break;
  }
  return out;
}

}  // namespace
}  // namespace tokenspeed::cuda

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) {
  m.impl("paged_prefill_attention", &tokenspeed::cuda::paged_prefill_attention_cuda);
}
