// CUDA host side of the log-prob ops (logprobs, logprob_partials, head_logprob_partials,
// combine_logprob_partials, logprob_topk_partials, logprob_mass_above, filter_kept_set):
// argument checks, device guard, output allocation and error
// reporting over the launch functions of launch.h (kernels in logprobs.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cuda/host_utils.h"
#include "cuda/launch.h"
#include "op_checks.h"

namespace tokenspeed::cuda {
namespace {

float inv_temperature(double temperature) { return static_cast<float>(1.0 / temperature); }

// The row stride the kernels take: a one-row tensor's stride(0) may be anything.
int64_t logits_ld(const at::Tensor& logits) {
  return logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
}

// Chunk states [T, C, 4] (m and t in logit units) of logits [T, V], targets global ids;
// with maxima != nullptr also the chunk threads' maxima into it, [T, C, 256].
at::Tensor chunk_states(const at::Tensor& logits, const at::Tensor& targets,
                        int64_t vocab_start, double temperature, cudaStream_t stream,
                        at::Tensor* maxima = nullptr) {
  const int64_t rows = logits.size(0), v = logits.size(1);
  const DType dtype = dtype_of(logits);
  const int64_t chunks = logprob_num_chunks(v, dtype);
  TS_CHECK(rows * chunks <= std::numeric_limits<int32_t>::max(), "logits has ", rows,
              " rows of ", v, " columns, more than one launch handles");
  at::Tensor state = at::empty({rows, chunks, 4}, logits.options().dtype(at::kFloat));
  if (maxima != nullptr)
    *maxima = at::empty({rows, chunks, kLogprobChunkThreads}, logits.options().dtype(at::kFloat));
  const int64_t ld = logits_ld(logits);
  C10_CUDA_CHECK(launch_logprob_chunks(
      logits.const_data_ptr(), dtype, rows, ld, v, targets.const_data_ptr(),
      targets.scalar_type() == at::kLong, targets.stride(0), vocab_start,
      inv_temperature(temperature), state.data_ptr<float>(),
      maxima != nullptr ? maxima->data_ptr<float>() : nullptr, stream));
  return state;
}

// Ordered merge of n states per row; row r's item i at states[r * row_stride + i * item_stride].
void merge(const at::Tensor& states, int64_t row_stride, int64_t item_stride, int64_t n,
           int64_t rows, float inv_temp, float* merged, float* lp, float* ent,
           cudaStream_t stream) {
  if (rows == 0) return;
  C10_CUDA_CHECK(launch_merge_states(states.const_data_ptr<float>(), row_stride, item_stride,
                                     n, rows, inv_temp, merged, lp, ent, stream));
}

// The range check reads the targets back to the host; it runs after the launches (the
// kernels ignore out-of-range targets) so that its round trip overlaps them.
std::tuple<at::Tensor, at::Tensor> logprobs_cuda(const at::Tensor& logits,
                                                 const at::Tensor& targets, double temperature,
                                                 bool return_entropy, bool validate) {
  check_logits_targets(logits, targets);
  check_cuda(logits, "logits");
  check_temperature(temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({rows}, f32);
  at::Tensor ent = at::empty({return_entropy ? rows : 0}, f32);
  if (rows == 0) return {lp, ent};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor state = chunk_states(logits, targets, 0, temperature, stream);
  const int64_t chunks = state.size(1);
  merge(state, chunks, 1, chunks, rows, inv_temperature(temperature), nullptr,
        lp.data_ptr<float>(), return_entropy ? ent.data_ptr<float>() : nullptr, stream);
  if (validate) check_target_range(targets, 0, logits.size(1));
  return {lp, ent};
}

at::Tensor logprob_partials_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                 int64_t vocab_start, double temperature, bool validate) {
  check_logits_targets(logits, targets);
  check_cuda(logits, "logits");
  check_temperature(temperature);
  check_vocab_start(vocab_start);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  at::Tensor out = at::empty({rows, 4}, logits.options().dtype(at::kFloat));
  if (rows == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor state = chunk_states(logits, targets, vocab_start, temperature, stream);
  const int64_t chunks = state.size(1);
  merge(state, chunks, 1, chunks, rows, inv_temperature(temperature), out.data_ptr<float>(),
        nullptr, nullptr, stream);
  if (validate) check_target_range(targets, 0, -1);
  return out;
}

// The fused kernel where gemm_sm90_supports says it serves the call (its split and K
// order fixed by V and H: batch-invariant as it is); else the fp32 product a bounded block
// of rows at a time, through logprob_partials' kernels, the last block zero-padded to the
// others' rows where batch_invariant asks (cuBLAS picks its algorithm by the shape).
at::Tensor head_logprob_partials_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                      const at::Tensor& targets, int64_t vocab_start,
                                      double temperature, bool validate, bool batch_invariant) {
  check_head_inputs(hidden, weight, targets);
  check_cuda(hidden, "hidden");
  check_temperature(temperature);
  check_vocab_start(vocab_start);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t rows = hidden.size(0), v = weight.size(0), h = hidden.size(1);
  at::Tensor out = at::empty({rows, 4}, hidden.options().dtype(at::kFloat));
  if (rows == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float inv_temp = inv_temperature(temperature);
  const DType dtype = dtype_of(hidden);
  const int64_t ld_hidden = rows > 1 ? hidden.stride(0) : h;
  const int64_t ld_weight = v > 1 ? weight.stride(0) : h;
  const int64_t splits = head_partials_splits(v);
  // the kernel numbers its units and addresses weight rows (TMA coordinates) with int32
  if (gemm_sm90_supports(dtype, h, hidden.const_data_ptr(), ld_hidden, weight.const_data_ptr(),
                         ld_weight) &&
      gemm_sm90_row_tiles(rows) * splits <= std::numeric_limits<int32_t>::max() &&
      v <= (int64_t(1) << 30)) {
    const at::Tensor state = at::empty({rows, splits, 4}, out.options());
    C10_CUDA_CHECK(launch_head_partials(
        hidden.const_data_ptr(), ld_hidden, weight.const_data_ptr(), ld_weight, dtype, rows, v,
        h, targets.const_data_ptr(), targets.scalar_type() == at::kLong, targets.stride(0),
        vocab_start, inv_temp, state.data_ptr<float>(), stream));
    merge(state, splits, 1, splits, rows, inv_temp, out.data_ptr<float>(), nullptr, nullptr,
          stream);
  } else {
    // fp32 logits of at most 2^26 elements a block; batch-invariant blocks also of at most
    // 2048 rows, as a call of fewer rows is padded to a whole block
    int64_t step = std::max<int64_t>(1, (int64_t(1) << 26) / v);
    if (batch_invariant) step = std::min<int64_t>(step, 2048);
    for (int64_t r = 0; r < rows; r += step) {
      const int64_t n = std::min(step, rows - r);
      at::Tensor block = hidden.narrow(0, r, n);
      if (batch_invariant && n < step) block = at::constant_pad_nd(block, {0, 0, 0, step - n});
      at::Tensor logits = dtype == DType::kFloat32 ? at::mm(block, weight.t())
                                                   : at::mm(block, weight.t(), at::kFloat);
      logits = logits.narrow(0, 0, n);
      const at::Tensor state =
          chunk_states(logits, targets.narrow(0, r, n), vocab_start, temperature, stream);
      const int64_t chunks = state.size(1);
      merge(state, chunks, 1, chunks, n, inv_temp, out.data_ptr<float>() + 4 * r, nullptr,
            nullptr, stream);
    }
  }
  if (validate) check_target_range(targets, 0, -1);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_topk_partials_cuda(
    const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
    double temperature, int64_t k, bool validate) {
  check_logits_targets(logits, targets);
  check_cuda(logits, "logits");
  check_temperature(temperature);
  check_vocab_start(vocab_start);
  check_topk(k);
  TS_CHECK(logits.size(1) <= std::numeric_limits<int32_t>::max(), "logits has ",
           logits.size(1), " columns, more than the top-k kernel indexes");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor out = at::empty({rows, 4}, f32);
  if (rows == 0)
    return {out, at::empty({0, k}, f32), at::empty({0, k}, logits.options().dtype(at::kLong))};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor maxima;
  const at::Tensor state =
      chunk_states(logits, targets, vocab_start, temperature, stream, &maxima);
  const int64_t chunks = state.size(1);
  merge(state, chunks, 1, chunks, rows, inv_temperature(temperature), out.data_ptr<float>(),
        nullptr, nullptr, stream);
  at::Tensor top_vals = at::empty({rows, k}, f32);
  at::Tensor top_ids = at::empty({rows, k}, logits.options().dtype(at::kLong));
  const int64_t ld = logits_ld(logits);
  C10_CUDA_CHECK(launch_row_topk(logits.const_data_ptr(), dtype_of(logits), rows, ld,
                                 logits.size(1), maxima.const_data_ptr<float>(),
                                 inv_temperature(temperature), static_cast<int>(k),
                                 vocab_start, top_vals.data_ptr<float>(),
                                 top_ids.data_ptr<int64_t>(), stream));
  if (validate) check_target_range(targets, 0, -1);
  return {out, top_vals, top_ids};
}

at::Tensor logprob_mass_above_cuda(const at::Tensor& logits, double temperature,
                                   const at::Tensor& thresholds, const at::Tensor& ref_m) {
  check_mass_above(logits, thresholds, ref_m);
  check_cuda(logits, "logits");
  check_temperature(temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), n = thresholds.size(1);
  at::Tensor out = at::empty({rows, n, 2}, logits.options().dtype(at::kFloat));
  if (rows == 0 || n == 0) return out;
  const at::Tensor th = thresholds.contiguous(), rm = ref_m.contiguous();
  const int64_t ld = logits_ld(logits);
  C10_CUDA_CHECK(launch_mass_above(logits.const_data_ptr(), dtype_of(logits), rows, ld,
                                   logits.size(1), inv_temperature(temperature),
                                   th.const_data_ptr<float>(), n, rm.const_data_ptr<float>(),
                                   out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_kept_set_cuda(
    const at::Tensor& values, const at::Tensor& ids, const at::Tensor& ref_m,
    const at::Tensor& big_s, const at::Tensor& big_w, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p,
    const std::optional<at::Tensor>& pass_mass) {
  check_kept_set(values, ids, ref_m, big_s, big_w, top_k, top_p, min_p, pass_mass);
  check_cuda(values, "values");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t rows = values.size(0);
  at::Tensor tau = at::empty({rows}, values.options()), s_kept = at::empty_like(tau),
             w_kept = at::empty_like(tau),
             pending = at::empty({rows}, values.options().dtype(at::kBool));
  if (rows == 0) return {tau, s_kept, w_kept, pending};
  const at::Tensor v = values.contiguous(), i = ids.contiguous();
  const at::Tensor rm = ref_m.contiguous(), s = big_s.contiguous(), w = big_w.contiguous(),
                   tk = top_k.contiguous(), tp = top_p.contiguous(), mp = min_p.contiguous();
  const at::Tensor pass = pass_mass.has_value() ? pass_mass->contiguous() : at::Tensor();
  C10_CUDA_CHECK(launch_kept_set(
      v.const_data_ptr<float>(), i.const_data_ptr<int64_t>(), rows,
      static_cast<int>(values.size(1)), rm.const_data_ptr<float>(), s.const_data_ptr<float>(),
      w.const_data_ptr<float>(), tk.const_data_ptr<int64_t>(), tp.const_data_ptr<float>(),
      mp.const_data_ptr<float>(), pass.defined() ? pass.const_data_ptr<float>() : nullptr,
      tau.data_ptr<float>(), s_kept.data_ptr<float>(),
      w_kept.data_ptr<float>(), pending.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream()));
  return {tau, s_kept, w_kept, pending};
}

std::tuple<at::Tensor, at::Tensor> combine_logprob_partials_cuda(const at::Tensor& partials) {
  check_partials(partials);
  check_cuda(partials, "partials");
  const c10::cuda::CUDAGuard guard(partials.device());
  const at::Tensor p = partials.contiguous();
  const int64_t shards = p.size(0), rows = p.size(1);
  at::Tensor lp = at::empty({rows}, p.options()), ent = at::empty({rows}, p.options());
  merge(p, 1, rows, shards, rows, 1.f, nullptr, lp.data_ptr<float>(), ent.data_ptr<float>(),
        c10::cuda::getCurrentCUDAStream());
  return {lp, ent};
}

}  // namespace
}  // namespace tokenspeed::cuda

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) {
  m.impl("logprobs", &tokenspeed::cuda::logprobs_cuda);
  m.impl("logprob_partials", &tokenspeed::cuda::logprob_partials_cuda);
  m.impl("head_logprob_partials", &tokenspeed::cuda::head_logprob_partials_cuda);
  m.impl("combine_logprob_partials", &tokenspeed::cuda::combine_logprob_partials_cuda);
  m.impl("logprob_topk_partials", &tokenspeed::cuda::logprob_topk_partials_cuda);
  m.impl("logprob_mass_above", &tokenspeed::cuda::logprob_mass_above_cuda);
  m.impl("filter_kept_set", &tokenspeed::cuda::filter_kept_set_cuda);
}
