// Argument checks shared by the CPU and CUDA backends, so both reject the same inputs
// with the same messages. Each message names the argument and the offending value.
// Shape/dtype checks cost nothing; the data-dependent ones (target range, page-table
// coverage) read a few reduced scalars back to the host, once per call.
//
// Defined once, in op_checks.cpp (host compiler only): they throw c10::Error, and no
// translation unit compiled by nvcc includes this header.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <type_traits>

namespace tokenspeed {

// Error messages are assembled here without iostreams. On a toolchain whose libstdc++
// pieces are partly linked into the extension (seen on the GPU machine's image), the
// extension's own copy of ostream's number insertion looked up locale facets by ids that
// did not match the process's libstdc++ and crashed instead of raising. TS_CHECK hands
// TORCH_CHECK one finished std::string, which c10 passes through untouched.
namespace msg_detail {
inline void append(std::string& out, const char* s) { out += s; }
inline void append(std::string& out, const std::string& s) { out += s; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& out, T x) { out += std::to_string(x); }
void append(std::string& out, double x);  // like printf's %g
void append(std::string& out, c10::IntArrayRef values);  // [2, 3, 4]
void append(std::string& out, at::ScalarType t);
void append(std::string& out, const c10::Device& d);
}  // namespace msg_detail

template <typename... Args>
std::string msg(const Args&... args) {
  std::string out;
  (msg_detail::append(out, args), ...);
  return out;
}

}  // namespace tokenspeed

#define TS_CHECK(cond, ...) TORCH_CHECK(cond, ::tokenspeed::msg(__VA_ARGS__))

namespace tokenspeed {

void check_float_input(const at::Tensor& t, const char* name);

void check_index_input(const at::Tensor& t, const char* name);

void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b,
                       const char* bn);

constexpr double kMinTemperature = 1e-6;

void check_temperature(double temperature);

// logits [T, V] with unit stride along V (any row stride), targets [T].
void check_logits_targets(const at::Tensor& logits, const at::Tensor& targets);

// hidden [T, H] and weight [V, H] of one float dtype, unit stride along H; targets [T].
void check_head_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                       const at::Tensor& targets);

// First global vocabulary id of a shard.
void check_vocab_start(int64_t vocab_start);

// Every target must lie in [lo, hi) (hi < 0: no upper bound, for vocabulary shards).
void check_target_range(const at::Tensor& targets, int64_t lo, int64_t hi);

void check_partials(const at::Tensor& partials);

// Candidates per row of logprob_topk_partials.
constexpr int64_t kMaxTopK = 64;

void check_topk(int64_t k);

// Thresholds per row of logprob_mass_above: one per thread of the CUDA kernel's block.
constexpr int64_t kMaxThresholds = 256;

// filter_kept_set's arguments (ops.cpp)
void check_kept_set(const at::Tensor& values, const at::Tensor& ids, const at::Tensor& ref_m,
                    const at::Tensor& big_s, const at::Tensor& big_w, const at::Tensor& top_k,
                    const at::Tensor& top_p, const at::Tensor& min_p,
                    const std::optional<at::Tensor>& pass_mass);
// thresholds [T, n] (n <= 256) and ref_m [T] float32 for logits [T, V], on logits' device.
void check_mass_above(const at::Tensor& logits, const at::Tensor& thresholds,
                      const at::Tensor& ref_m);

// k, v [N, Hk, D]; caches [P, page_size, Hk, D]; slot_mapping [N].
// validate=false skips the data-dependent slot-range check.
void check_store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping, bool validate);

// The softmax scale paged_prefill_attention uses: scale, else 1 / sqrt(head_dim).
float attention_scale(const std::optional<double>& scale, int64_t head_dim);

// Arguments of paged_prefill_attention; throws on the first problem. With validate, also
// the metadata's values (one host copy of it): cu_seqlens_q, kv_lens against the page
// table, page ids, and max_seqlen_q (when given) against the longest request. A scale
// of None means D**-0.5.
void check_paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& page_table,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& kv_lens,
                           const std::optional<double>& scale,
                           std::optional<int64_t> max_seqlen_q, bool validate);

// x [N, H] or [N, M, H] with unit stride along H; weight [H] in x's dtype; residual (if
// given) x's shape, dtype and device, unit stride along H; eps finite and >= 0.
void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    const std::optional<at::Tensor>& residual);

// gate_up [N, 2I] with unit stride along the columns.
void check_silu_and_mul(const at::Tensor& gate_up);

// positions [N]; q [N, Hq, D], k [N, Hk, D] (q's dtype, unit stride along D, D even);
// cos_sin_cache [max_pos, D] contiguous fp32. validate: every position in [0, max_pos)
// (one min/max reduction read back to the host).
void check_rotary_embedding(const at::Tensor& positions, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& cos_sin_cache,
                            bool validate);

}  // namespace tokenspeed
