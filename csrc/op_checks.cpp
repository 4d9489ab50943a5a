// Definitions of the shared argument checks declared in op_checks.h.
#include "op_checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <utility>

#include "kept_set.h"

namespace tokenspeed {
namespace msg_detail {

void append(std::string& out, double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  out += buf;
}

void append(std::string& out, c10::IntArrayRef values) {
  out += "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(values[i]);
  }
  out += "]";
}

void append(std::string& out, at::ScalarType t) { out += c10::toString(t); }

void append(std::string& out, const c10::Device& d) { out += d.str(); }

}  // namespace msg_detail

void check_float_input(const at::Tensor& t, const char* name) {
  TS_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

void check_index_input(const at::Tensor& t, const char* name) {
  TS_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
              " must be int32 or int64, got ", t.scalar_type());
}

void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b,
                       const char* bn) {
  TS_CHECK(a.device() == b.device(), an, " is on ", a.device(), " but ", bn, " is on ",
              b.device());
}

void check_temperature(double temperature) {
  // Below the minimum, logits / temperature overflows fp32 for ordinary logits and the
  // log-probs turn into NaN (tokenspeed/inputs.py MIN_TEMPERATURE is the same bound).
  TS_CHECK(std::isfinite(temperature) && temperature >= kMinTemperature,
           "temperature must be finite and >= 1e-06, got ", temperature);
}

void check_logits_targets(const at::Tensor& logits, const at::Tensor& targets) {
  check_float_input(logits, "logits");
  check_index_input(targets, "targets");
  TS_CHECK(logits.dim() == 2, "logits must be 2-D [T, V], got shape ", logits.sizes());
  TS_CHECK(targets.dim() == 1, "targets must be 1-D [T], got shape ", targets.sizes());
  TS_CHECK(targets.size(0) == logits.size(0), "targets has ", targets.size(0),
              " entries but logits has ", logits.size(0), " rows");
  TS_CHECK(logits.size(1) > 0, "logits must have at least one vocabulary column");
  TS_CHECK(logits.size(1) == 1 || logits.stride(1) == 1,
              "logits must be contiguous along the vocabulary (stride(1) == 1), got strides ",
              logits.strides());
  check_same_device(logits, "logits", targets, "targets");
}

void check_head_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                       const at::Tensor& targets) {
  check_float_input(hidden, "hidden");
  check_float_input(weight, "weight");
  check_index_input(targets, "targets");
  TS_CHECK(hidden.dim() == 2, "hidden must be 2-D [T, H], got shape ", hidden.sizes());
  TS_CHECK(weight.dim() == 2, "weight must be 2-D [V, H], got shape ", weight.sizes());
  TS_CHECK(targets.dim() == 1, "targets must be 1-D [T], got shape ", targets.sizes());
  TS_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden is ", hidden.scalar_type(),
           " but weight is ", weight.scalar_type());
  TS_CHECK(hidden.size(1) == weight.size(1), "hidden has ", hidden.size(1),
           " columns but weight has ", weight.size(1));
  TS_CHECK(hidden.size(1) > 0, "hidden must have at least one column");
  TS_CHECK(weight.size(0) > 0, "weight must have at least one vocabulary row");
  TS_CHECK(targets.size(0) == hidden.size(0), "targets has ", targets.size(0),
           " entries but hidden has ", hidden.size(0), " rows");
  TS_CHECK(hidden.size(1) == 1 || (hidden.stride(1) == 1 && weight.stride(1) == 1),
           "hidden and weight must be contiguous along H (stride(1) == 1), got strides ",
           hidden.strides(), " and ", weight.strides());
  check_same_device(hidden, "hidden", weight, "weight");
  check_same_device(hidden, "hidden", targets, "targets");
}

void check_vocab_start(int64_t vocab_start) {
  TS_CHECK(vocab_start >= 0, "vocab_start must be >= 0, got ", vocab_start);
}

void check_target_range(const at::Tensor& targets, int64_t lo, int64_t hi) {
  if (targets.numel() == 0) return;
  auto mm = at::aminmax(targets);
  auto both = at::stack({std::get<0>(mm).to(at::kLong), std::get<1>(mm).to(at::kLong)}).cpu();
  const int64_t mn = both[0].item<int64_t>(), mx = both[1].item<int64_t>();
  if (mn < lo) {
    const int64_t row = at::argmin(targets).item<int64_t>();
    TS_CHECK(false, "targets[", row, "] is ", mn, ", below ", lo);
  }
  if (hi >= 0 && mx >= hi) {
    const int64_t row = at::argmax(targets).item<int64_t>();
    TS_CHECK(false, "targets[", row, "] is ", mx, ", outside the vocabulary [0, ", hi, ")");
  }
}

void check_partials(const at::Tensor& partials) {
  TS_CHECK(partials.scalar_type() == at::kFloat, "partials must be float32, got ",
              partials.scalar_type());
  TS_CHECK(partials.dim() == 3 && partials.size(2) == 4,
              "partials must be [S, T, 4], got shape ", partials.sizes());
  TS_CHECK(partials.size(0) >= 1, "partials needs at least one shard, got shape ",
              partials.sizes());
}

void check_topk(int64_t k) {
  TS_CHECK(k >= 1 && k <= kMaxTopK, "k must be in [1, ", kMaxTopK, "], got ", k);
}

void check_kept_set(const at::Tensor& values, const at::Tensor& ids, const at::Tensor& ref_m,
                    const at::Tensor& big_s, const at::Tensor& big_w, const at::Tensor& top_k,
                    const at::Tensor& top_p, const at::Tensor& min_p,
                    const std::optional<at::Tensor>& pass_mass) {
  static_assert(kMaxKeptCandidates == kMaxTopK, "the kept set takes the top-k op's lists");
  TS_CHECK(values.dim() == 2 && values.size(1) >= 1 && values.size(1) <= kMaxTopK,
           "values must be [T, k] with k in [1, ", kMaxTopK, "], got shape ", values.sizes());
  TS_CHECK(values.scalar_type() == at::kFloat, "values must be float32, got ",
           values.scalar_type());
  TS_CHECK(ids.sizes() == values.sizes() && ids.scalar_type() == at::kLong,
           "ids must be int64 of values' shape ", values.sizes(), ", got ", ids.scalar_type(),
           " ", ids.sizes());
  const int64_t rows = values.size(0);
  const std::pair<const at::Tensor*, const char*> per_row[] = {
      {&ref_m, "ref_m"}, {&big_s, "big_s"}, {&big_w, "big_w"}, {&top_p, "top_p"},
      {&min_p, "min_p"}, {&top_k, "top_k"}};
  for (const auto& [t, name] : per_row) {
    TS_CHECK(t->dim() == 1 && t->size(0) == rows, name, " must be [T] with T = ", rows,
             ", got shape ", t->sizes());
    TS_CHECK(t->scalar_type() == (t == &top_k ? at::kLong : at::kFloat), name, " must be ",
             t == &top_k ? "int64" : "float32", ", got ", t->scalar_type());
    check_same_device(values, "values", *t, name);
  }
  check_same_device(values, "values", ids, "ids");
  if (pass_mass.has_value()) {
    const at::Tensor& p = *pass_mass;
    TS_CHECK(p.dim() == 2 && p.size(0) == rows && p.size(1) == 2,
             "pass_mass must be [T, 2] with T = ", rows, ", got shape ", p.sizes());
    TS_CHECK(p.scalar_type() == at::kFloat, "pass_mass must be float32, got ", p.scalar_type());
    check_same_device(values, "values", p, "pass_mass");
  }
}

void check_mass_above(const at::Tensor& logits, const at::Tensor& thresholds,
                      const at::Tensor& ref_m) {
  check_float_input(logits, "logits");
  TS_CHECK(logits.dim() == 2, "logits must be 2-D [T, V], got shape ", logits.sizes());
  TS_CHECK(logits.size(1) == 1 || logits.stride(1) == 1,
           "logits must be contiguous along the vocabulary (stride(1) == 1), got strides ",
           logits.strides());
  TS_CHECK(thresholds.scalar_type() == at::kFloat && ref_m.scalar_type() == at::kFloat,
           "thresholds and ref_m must be float32, got ", thresholds.scalar_type(), " and ",
           ref_m.scalar_type());
  TS_CHECK(thresholds.dim() == 2 && thresholds.size(0) == logits.size(0),
           "thresholds must be [T, n] with T = ", logits.size(0), ", got shape ",
           thresholds.sizes());
  TS_CHECK(thresholds.size(1) <= kMaxThresholds, "thresholds must have at most ",
           kMaxThresholds, " columns, got ", thresholds.size(1));
  TS_CHECK(ref_m.dim() == 1 && ref_m.size(0) == logits.size(0), "ref_m must be [T] with T = ",
           logits.size(0), ", got shape ", ref_m.sizes());
  check_same_device(logits, "logits", thresholds, "thresholds");
  check_same_device(logits, "logits", ref_m, "ref_m");
}

void check_store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping, bool validate) {
  check_float_input(k, "k");
  TS_CHECK(v.scalar_type() == k.scalar_type(), "v has dtype ", v.scalar_type(),
              " but k has ", k.scalar_type());
  TS_CHECK(k_cache.scalar_type() == k.scalar_type() &&
                  v_cache.scalar_type() == k.scalar_type(),
              "k_cache/v_cache dtypes (", k_cache.scalar_type(), ", ", v_cache.scalar_type(),
              ") must match k (", k.scalar_type(), ")");
  check_index_input(slot_mapping, "slot_mapping");
  TS_CHECK(k.dim() == 3, "k must be [N, Hk, D], got shape ", k.sizes());
  TS_CHECK(v.sizes() == k.sizes(), "v has shape ", v.sizes(), " but k has ", k.sizes());
  TS_CHECK(k_cache.dim() == 4, "k_cache must be [P, page_size, Hk, D], got shape ",
              k_cache.sizes());
  TS_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache has shape ", v_cache.sizes(),
              " but k_cache has ", k_cache.sizes());
  TS_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2),
              "k_cache heads/dim ", k_cache.sizes(), " do not match k ", k.sizes());
  TS_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous");
  TS_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0),
              "slot_mapping must be [N] with N = ", k.size(0), ", got shape ",
              slot_mapping.sizes());
  check_same_device(k, "k", v, "v");
  check_same_device(k, "k", k_cache, "k_cache");
  check_same_device(k, "k", v_cache, "v_cache");
  check_same_device(k, "k", slot_mapping, "slot_mapping");
  if (validate && slot_mapping.numel() > 0) {
    const int64_t slots = k_cache.size(0) * k_cache.size(1);
    const int64_t mx = slot_mapping.max().item<int64_t>();
    if (mx >= slots) {
      const int64_t row = at::argmax(slot_mapping).item<int64_t>();
      TS_CHECK(false, "slot_mapping[", row, "] is ", mx, ", but the cache has ", slots,
                  " slots");
    }
  }
}

float attention_scale(const std::optional<double>& scale, int64_t head_dim) {
  return static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(head_dim)));
}

void check_paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& page_table,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& kv_lens,
                           const std::optional<double>& scale,
                           std::optional<int64_t> max_seqlen_q, bool validate) {
  check_float_input(q, "q");
  TS_CHECK(!scale.has_value() || std::isfinite(*scale), "scale must be finite, got ",
           scale.value_or(0.0));
  TS_CHECK(q.dim() == 3, "q must be [N, Hq, D], got shape ", q.sizes());
  TS_CHECK(k_cache.dim() == 4, "k_cache must be [P, page_size, Hk, D], got shape ",
              k_cache.sizes());
  TS_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache has shape ", v_cache.sizes(),
              " but k_cache has ", k_cache.sizes());
  TS_CHECK(k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(),
              "k_cache/v_cache dtypes (", k_cache.scalar_type(), ", ", v_cache.scalar_type(),
              ") must match q (", q.scalar_type(), ")");
  TS_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous");
  const int64_t hq = q.size(1), hk = k_cache.size(2), d = q.size(2);
  TS_CHECK(k_cache.size(3) == d, "head dim of q (", d, ") and k_cache (", k_cache.size(3),
              ") differ");
  TS_CHECK(hk >= 1 && hq % hk == 0, "query heads (", hq,
              ") must be a multiple of kv heads (", hk, ")");
  TS_CHECK(page_table.scalar_type() == at::kInt, "page_table must be int32, got ",
              page_table.scalar_type());
  TS_CHECK(cu_seqlens_q.scalar_type() == at::kInt, "cu_seqlens_q must be int32, got ",
              cu_seqlens_q.scalar_type());
  TS_CHECK(kv_lens.scalar_type() == at::kInt, "kv_lens must be int32, got ",
              kv_lens.scalar_type());
  TS_CHECK(page_table.dim() == 2, "page_table must be [B, max_pages], got shape ",
              page_table.sizes());
  const int64_t b = page_table.size(0);
  TS_CHECK(kv_lens.dim() == 1 && kv_lens.size(0) == b, "kv_lens must be [B] with B = ", b,
              ", got shape ", kv_lens.sizes());
  TS_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) == b + 1,
              "cu_seqlens_q must be [B+1] with B = ", b, ", got shape ", cu_seqlens_q.sizes());
  TS_CHECK(page_table.stride(1) == 1 || page_table.size(1) <= 1,
              "page_table rows must be contiguous");
  for (const auto* t : {&k_cache, &v_cache, &page_table, &cu_seqlens_q, &kv_lens})
    check_same_device(q, "q", *t, "the paged-attention metadata/caches");

  TS_CHECK(!max_seqlen_q.has_value() || *max_seqlen_q >= 0,
           "max_seqlen_q must be >= 0, got ", max_seqlen_q.value_or(0));
  if (!validate) return;

  // Data-dependent: one small host copy of the metadata.
  const int64_t page_size = k_cache.size(1), num_pages = k_cache.size(0);
  auto cu = cu_seqlens_q.to(at::kCPU, at::kLong);
  auto lens = kv_lens.to(at::kCPU, at::kLong);
  auto cu_a = cu.accessor<int64_t, 1>();
  auto lens_a = lens.accessor<int64_t, 1>();
  TS_CHECK(cu_a[0] == 0, "cu_seqlens_q[0] must be 0, got ", cu_a[0]);
  TS_CHECK(cu_a[b] == q.size(0), "cu_seqlens_q[", b, "] is ", cu_a[b],
              " but q has ", q.size(0), " tokens");
  for (int64_t i = 0; i < b; ++i) {
    const int64_t n = cu_a[i + 1] - cu_a[i];
    TS_CHECK(n >= 0, "cu_seqlens_q must be non-decreasing, but cu_seqlens_q[", i + 1,
                "] = ", cu_a[i + 1], " < cu_seqlens_q[", i, "] = ", cu_a[i]);
    TS_CHECK(lens_a[i] >= n, "kv_lens[", i, "] is ", lens_a[i], " but request ", i,
                " has ", n, " new tokens");
    TS_CHECK(!max_seqlen_q.has_value() || n <= *max_seqlen_q, "max_seqlen_q is ",
             max_seqlen_q.value_or(0), " but request ", i, " has ", n, " new tokens");
    TS_CHECK(lens_a[i] <= page_table.size(1) * page_size, "kv_lens[", i, "] is ",
                lens_a[i], " but page_table has room for ", page_table.size(1) * page_size,
                " tokens (", page_table.size(1), " pages of ", page_size, ")");
  }
  if (b > 0 && page_table.numel() > 0) {
    // Only the pages a request actually uses must be valid.
    auto pt = page_table.to(at::kCPU);
    auto pt_a = pt.accessor<int32_t, 2>();
    for (int64_t i = 0; i < b; ++i) {
      const int64_t used = (lens_a[i] + page_size - 1) / page_size;
      for (int64_t j = 0; j < used; ++j) {
        TS_CHECK(pt_a[i][j] >= 0 && pt_a[i][j] < num_pages, "page_table[", i, ", ", j,
                    "] is ", pt_a[i][j], ", outside [0, ", num_pages, ")");
      }
    }
  }
}

void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    const std::optional<at::Tensor>& residual) {
  check_float_input(x, "x");
  TS_CHECK(x.dim() == 2 || x.dim() == 3, "x must be [N, H] or [N, M, H], got shape ",
           x.sizes());
  const int64_t h = x.size(-1);
  TS_CHECK(h >= 1, "x must have at least one column, got shape ", x.sizes());
  TS_CHECK(h == 1 || x.stride(-1) == 1,
           "x must be contiguous along its last dimension, got strides ", x.strides());
  TS_CHECK(weight.scalar_type() == x.scalar_type(), "weight has dtype ", weight.scalar_type(),
           " but x has ", x.scalar_type());
  TS_CHECK(weight.dim() == 1 && weight.size(0) == h, "weight must be [H] with H = ", h,
           ", got shape ", weight.sizes());
  TS_CHECK(h == 1 || weight.stride(0) == 1, "weight must be contiguous, got strides ",
           weight.strides());
  check_same_device(x, "x", weight, "weight");
  TS_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0, got ", eps);
  if (!residual.has_value()) return;
  const at::Tensor& r = *residual;
  TS_CHECK(r.scalar_type() == x.scalar_type(), "residual has dtype ", r.scalar_type(),
           " but x has ", x.scalar_type());
  TS_CHECK(r.sizes() == x.sizes(), "residual has shape ", r.sizes(), " but x has ",
           x.sizes());
  TS_CHECK(h == 1 || r.stride(-1) == 1,
           "residual must be contiguous along its last dimension, got strides ", r.strides());
  check_same_device(x, "x", r, "residual");
}

void check_silu_and_mul(const at::Tensor& gate_up) {
  check_float_input(gate_up, "gate_up");
  TS_CHECK(gate_up.dim() == 2, "gate_up must be [N, 2I], got shape ", gate_up.sizes());
  TS_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns, got ",
           gate_up.size(1));
  TS_CHECK(gate_up.size(1) <= 1 || gate_up.stride(1) == 1,
           "gate_up must be contiguous along the columns, got strides ", gate_up.strides());
}

void check_rotary_embedding(const at::Tensor& positions, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& cos_sin_cache,
                            bool validate) {
  check_float_input(q, "q");
  TS_CHECK(q.dim() == 3, "q must be [N, Hq, D], got shape ", q.sizes());
  TS_CHECK(k.dim() == 3, "k must be [N, Hk, D], got shape ", k.sizes());
  TS_CHECK(k.scalar_type() == q.scalar_type(), "k has dtype ", k.scalar_type(),
           " but q has ", q.scalar_type());
  const int64_t n = q.size(0), d = q.size(2);
  TS_CHECK(k.size(0) == n && k.size(2) == d, "k has shape ", k.sizes(), " but q has ",
           q.sizes());
  TS_CHECK(d >= 2 && d % 2 == 0, "head dim must be even and >= 2, got ", d);
  TS_CHECK(q.stride(2) == 1 && k.stride(2) == 1,
           "q and k must be contiguous along the head dim, got strides ", q.strides(),
           " and ", k.strides());
  check_index_input(positions, "positions");
  TS_CHECK(positions.dim() == 1 && positions.size(0) == n,
           "positions must be [N] with N = ", n, ", got shape ", positions.sizes());
  TS_CHECK(cos_sin_cache.scalar_type() == at::kFloat, "cos_sin_cache must be float32, got ",
           cos_sin_cache.scalar_type());
  TS_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == d,
           "cos_sin_cache must be [max_pos, D] with D = ", d, ", got shape ",
           cos_sin_cache.sizes());
  TS_CHECK(cos_sin_cache.is_contiguous(), "cos_sin_cache must be contiguous");
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", positions, "positions");
  check_same_device(q, "q", cos_sin_cache, "cos_sin_cache");
  if (!validate || n == 0) return;
  const int64_t max_pos = cos_sin_cache.size(0);
  auto mm = at::aminmax(positions);
  auto both =
      at::stack({std::get<0>(mm).to(at::kLong), std::get<1>(mm).to(at::kLong)}).cpu();
  const int64_t mn = both[0].item<int64_t>(), mx = both[1].item<int64_t>();
  if (mn < 0) {
    const int64_t row = at::argmin(positions).item<int64_t>();
    TS_CHECK(false, "positions[", row, "] is ", mn, ", below 0");
  }
  if (mx >= max_pos) {
    const int64_t row = at::argmax(positions).item<int64_t>();
    TS_CHECK(false, "positions[", row, "] is ", mx, ", but cos_sin_cache holds ", max_pos,
             " positions");
  }
}

}  // namespace tokenspeed
