// CUDA launchers of logprobs, logprob_partials and combine_logprob_partials
// (kernels in logprobs.cuh). All three end in the same ordered merge of fp32 states.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/logprobs.cuh"
#include "op_checks.h"

namespace tokenspeed::cuda {
namespace {

constexpr int kMergeThreads = 256;

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

float inv_temperature(double temperature) { return static_cast<float>(1.0 / temperature); }

// Chunk states [T, C, 4] (m and t in logit units) of logits [T, V] (targets shifted by vocab_start).
at::Tensor chunk_states(const at::Tensor& logits, const at::Tensor& targets,
                        int64_t vocab_start, double temperature) {
  const int64_t rows = logits.size(0), v = logits.size(1);
  const int64_t chunks = (v + kChunk - 1) / kChunk;
  TORCH_CHECK(chunks <= 65535, "logits has ", v, " columns, more than this kernel handles");
  at::Tensor tgt = targets.to(at::kLong).contiguous();
  at::Tensor state = at::empty({rows, chunks, 4}, logits.options().dtype(at::kFloat));
  const float inv_temp = inv_temperature(temperature);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t ld = rows > 1 ? logits.stride(0) : v;
  auto launch = [&](auto tag) {
    using kernel_t = decltype(tag);
    logprob_chunk_kernel<kernel_t><<<grid, kLpThreads, 0, stream>>>(
        static_cast<const kernel_t*>(logits.const_data_ptr()), ld, v,
        tgt.const_data_ptr<int64_t>(), vocab_start, inv_temp,
        reinterpret_cast<float4*>(state.data_ptr<float>()), static_cast<int>(chunks));
  };
  switch (logits.scalar_type()) {
    case at::kBFloat16: launch(__nv_bfloat16{}); break;
    case at::kHalf: launch(__half{}); break;
    default: launch(float{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return state;
}

// Ordered merge of n states per row; row r's item i at states[r * row_stride + i * item_stride].
void merge(const at::Tensor& states, int64_t row_stride, int64_t item_stride, int64_t n,
           int64_t rows, float inv_temp, float* merged, float* lp, float* ent) {
  if (rows == 0) return;
  const auto blocks = static_cast<unsigned>((rows + kMergeThreads - 1) / kMergeThreads);
  merge_states_kernel<<<blocks, kMergeThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const float4*>(states.const_data_ptr<float>()), row_stride, item_stride,
      static_cast<int>(n), rows, inv_temp, reinterpret_cast<float4*>(merged), lp, ent);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> logprobs_cuda(const at::Tensor& logits,
                                                 const at::Tensor& targets, double temperature,
                                                 bool return_entropy) {
  check_logits_targets(logits, targets);
  check_cuda(logits, "logits");
  check_temperature(temperature);
  check_target_range(targets, 0, logits.size(1));
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({rows}, f32);
  at::Tensor ent = at::empty({return_entropy ? rows : 0}, f32);
  if (rows == 0) return {lp, ent};
  const at::Tensor state = chunk_states(logits, targets, 0, temperature);
  const int64_t chunks = state.size(1);
  merge(state, chunks, 1, chunks, rows, inv_temperature(temperature), nullptr,
        lp.data_ptr<float>(),
        return_entropy ? ent.data_ptr<float>() : nullptr);
  return {lp, ent};
}

at::Tensor logprob_partials_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                 int64_t vocab_start, double temperature) {
  check_logits_targets(logits, targets);
  check_cuda(logits, "logits");
  check_temperature(temperature);
  check_vocab_start(vocab_start);
  check_target_range(targets, 0, -1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  at::Tensor out = at::empty({rows, 4}, logits.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const at::Tensor state = chunk_states(logits, targets, vocab_start, temperature);
  const int64_t chunks = state.size(1);
  merge(state, chunks, 1, chunks, rows, inv_temperature(temperature), out.data_ptr<float>(),
        nullptr, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_logprob_partials_cuda(const at::Tensor& partials) {
  check_partials(partials);
  check_cuda(partials, "partials");
  const c10::cuda::CUDAGuard guard(partials.device());
  const at::Tensor p = partials.contiguous();
  const int64_t shards = p.size(0), rows = p.size(1);
  at::Tensor lp = at::empty({rows}, p.options()), ent = at::empty({rows}, p.options());
  merge(p, 1, rows, shards, rows, 1.f, nullptr, lp.data_ptr<float>(), ent.data_ptr<float>());
  return {lp, ent};
}

}  // namespace
}  // namespace tokenspeed::cuda

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) {
  m.impl("logprobs", &tokenspeed::cuda::logprobs_cuda);
  m.impl("logprob_partials", &tokenspeed::cuda::logprob_partials_cuda);
  m.impl("combine_logprob_partials", &tokenspeed::cuda::combine_logprob_partials_cuda);
}
