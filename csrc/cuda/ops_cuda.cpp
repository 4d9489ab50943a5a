// CUDA implementations of the tokenspeed ops: argument checks, device guard, output
// allocation and error reporting, compiled by the host compiler. The kernels are reached
// only through the plain launch functions of launch.h (compiled by nvcc), which return
// cudaError_t; every exception is thrown here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cuda/host_utils.h"
#include "cuda/launch.h"
#include "op_checks.h"

namespace tokenspeed::cuda {
namespace {

float inv_temperature(double temperature) { return static_cast<float>(1.0 / temperature); }

// Chunk states [T, C, 4] (m and t in logit units) of logits [T, V], targets global ids.
at::Tensor chunk_states(const at::Tensor& logits, const at::Tensor& targets,
                        int64_t vocab_start, double temperature, cudaStream_t stream) {
  const int64_t rows = logits.size(0), v = logits.size(1);
  const DType dtype = dtype_of(logits);
  const int64_t chunks = logprob_num_chunks(v, dtype);
  TS_CHECK(rows * chunks <= std::numeric_limits<int32_t>::max(), "logits has ", rows,
              " rows of ", v, " columns, more than one launch handles");
  at::Tensor state = at::empty({rows, chunks, 4}, logits.options().dtype(at::kFloat));
  const int64_t ld = rows > 1 ? logits.stride(0) : v;
  C10_CUDA_CHECK(launch_logprob_chunks(
      logits.const_data_ptr(), dtype, rows, ld, v, targets.const_data_ptr(),
      targets.scalar_type() == at::kLong, targets.stride(0), vocab_start,
      inv_temperature(temperature), state.data_ptr<float>(), stream));
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
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DType dtype = dtype_of(q);

  if (paged_attention_mma_supports(dtype, static_cast<int>(d))) {
    // The grid covers the longest request; without max_seqlen_q, read cu_seqlens_q back.
    int64_t max_rows = 0;
    if (max_seqlen_q.has_value()) {
      max_rows = std::min<int64_t>(*max_seqlen_q, n);
    } else {
      const at::Tensor cu_host = cu.cpu();
      const int32_t* cu_h = cu_host.const_data_ptr<int32_t>();
      for (int64_t i = 0; i < b; ++i) max_rows = std::max<int64_t>(max_rows, cu_h[i + 1] - cu_h[i]);
    }
    const int64_t rows_per_tile = paged_attention_rows_per_tile();
    const int64_t tiles = (max_rows * p.group + rows_per_tile - 1) / rows_per_tile;
    TS_CHECK(tiles <= 65535 && b <= 65535 && hk <= 65535,
                "paged_prefill_attention: batch too large for one launch");
    if (tiles == 0) return out;
    C10_CUDA_CHECK(launch_paged_attention_mma(p, dtype, static_cast<int>(b),
                                              static_cast<int>(tiles), stream));
    return out;
  }

  const int max_dim = paged_attention_simple_max_dim();
  TS_CHECK(d <= max_dim, "paged_prefill_attention on CUDA supports head dims up to ",
              max_dim, ", got ", d);
  const at::Tensor cu_host = cu.cpu();
  const int32_t* cu_h = cu_host.const_data_ptr<int32_t>();
  std::vector<int32_t> req(n);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t t = cu_h[i]; t < cu_h[i + 1]; ++t) req[t] = static_cast<int32_t>(i);
  const at::Tensor req_of =
      at::from_blob(req.data(), {n}, at::TensorOptions().dtype(at::kInt)).to(q.device());
  C10_CUDA_CHECK(launch_paged_attention_simple(p, dtype, req_of.const_data_ptr<int32_t>(), n,
                                               stream));
  return out;
}

}  // namespace
}  // namespace tokenspeed::cuda

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) {
  m.impl("logprobs", &tokenspeed::cuda::logprobs_cuda);
  m.impl("logprob_partials", &tokenspeed::cuda::logprob_partials_cuda);
  m.impl("combine_logprob_partials", &tokenspeed::cuda::combine_logprob_partials_cuda);
  m.impl("store_kv", &tokenspeed::cuda::store_kv_cuda);
  m.impl("paged_prefill_attention", &tokenspeed::cuda::paged_prefill_attention_cuda);
}
