// CUDA host side of the moe ops: argument checks (moe_checks.h), device guard, outputs,
// the router's shared-memory bound, the grouped GEMM's dense inputs and tile table, and
// errors, over the launchers of moe_launch.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "cuda/host_utils.h"
#include "cuda/moe_launch.h"
#include "moe_checks.h"

namespace tokenspeed::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits, int64_t top_k,
                                                  bool renormalize,
                                                  const std::optional<at::Tensor>& forced,
                                                  bool validate) {
  check_moe_route(logits, top_k, forced, validate);
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), experts = logits.size(1);
  at::Tensor weights = at::empty({rows, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({rows, top_k}, logits.options().dtype(at::kInt));
  const at::Tensor f = forced.has_value() ? forced->contiguous() : at::Tensor();
  // E <= kMaxExperts keeps the router's shared memory within the 48 KiB every launch gets
  TORCH_INTERNAL_ASSERT(moe_route_smem_bytes(experts) <= 48 * 1024);
  C10_CUDA_CHECK(launch_moe_route(logits.const_data_ptr(), dtype_of(logits), logits.stride(0),
                                  rows, experts, top_k, renormalize,
                                  f.defined() ? f.const_data_ptr<int32_t>() : nullptr,
                                  weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                                  c10::cuda::getCurrentCUDAStream()));
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch_cuda(const at::Tensor& ids,
                                                                 int64_t num_experts,
                                                                 bool validate) {
  check_moe_dispatch(ids, num_experts, validate);
  check_cuda(ids, "ids");
  const c10::cuda::CUDAGuard guard(ids.device());
  const at::Tensor flat = ids.contiguous();
  const int64_t pairs = flat.numel();
  at::Tensor offsets = at::empty({num_experts + 1}, ids.options());
  at::Tensor sorted_tokens = at::empty({pairs}, ids.options());
  at::Tensor pair_rows = at::empty({pairs}, ids.options());
  C10_CUDA_CHECK(launch_moe_dispatch(flat.const_data_ptr<int32_t>(), pairs, ids.size(1),
                                     num_experts, offsets.data_ptr<int32_t>(),
                                     sorted_tokens.data_ptr<int32_t>(),
                                     pair_rows.data_ptr<int32_t>(),
                                     c10::cuda::getCurrentCUDAStream()));
  return {offsets, sorted_tokens, pair_rows};
}

at::Tensor moe_combine_cuda(const at::Tensor& expert_out, const at::Tensor& pair_rows,
                            const at::Tensor& weights) {
  check_moe_combine(expert_out, pair_rows, weights);
  check_cuda(expert_out, "expert_out");
  const c10::cuda::CUDAGuard guard(expert_out.device());
  const int64_t tokens = weights.size(0), h = expert_out.size(1);
  at::Tensor out = at::empty({tokens, h}, expert_out.options());
  const at::Tensor rows = pair_rows.contiguous();
  // a [*, 1] view may carry any stride along H; its rows are then expert_out.stride(0) apart
  C10_CUDA_CHECK(launch_moe_combine(expert_out.const_data_ptr(), dtype_of(expert_out),
                                    expert_out.stride(0), rows.const_data_ptr<int32_t>(),
                                    weights.const_data_ptr<float>(), tokens, weights.size(1),
                                    h, out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

// t contiguous from a 16-byte boundary (a copy only for a view that starts off one), as
// the grouped GEMM's 16-byte loads need; the values, hence the results, are unchanged.
at::Tensor dense_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

at::Tensor grouped_gemm_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& offsets, bool validate) {
  check_grouped_gemm(x, weight, offsets, validate);
  check_cuda(x, "x");
  const int64_t m = x.size(0), k = x.size(1), experts = weight.size(0), n = weight.size(1);
  // the kernels index rows and tiles in int32, and one grid row of blocks per column tile
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max() / 2, kMaxN = 65535 * 64;
  TS_CHECK(m <= kMax && k <= kMax && experts <= kMax && n <= kMaxN, "grouped_gemm takes M, K, "
           "E up to ", kMax, " and N up to ", kMaxN, ", got x ", x.sizes(), " and weight ",
           weight.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const at::Tensor xc = dense_aligned(x), wc = dense_aligned(weight);
  const at::Tensor off = offsets.contiguous();
  at::Tensor workspace = at::empty({grouped_gemm_workspace(experts)}, x.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_grouped_gemm(xc.const_data_ptr(), wc.const_data_ptr(), dtype_of(x),
                                     off.const_data_ptr(), off.scalar_type() == at::kLong, m, n,
                                     k, experts, workspace.data_ptr<int32_t>(), out.data_ptr(),
                                     c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace tokenspeed::cuda

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) {
  m.impl("moe_route", &tokenspeed::cuda::moe_route_cuda);
  m.impl("moe_dispatch", &tokenspeed::cuda::moe_dispatch_cuda);
  m.impl("moe_combine", &tokenspeed::cuda::moe_combine_cuda);
  m.impl("grouped_gemm", &tokenspeed::cuda::grouped_gemm_cuda);
}
