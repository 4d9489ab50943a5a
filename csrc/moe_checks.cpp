#include "moe_checks.h"

#include "op_checks.h"

namespace tokenspeed {

void check_moe_route(const at::Tensor& logits, int64_t top_k,
                     const std::optional<at::Tensor>& forced, bool validate) {
  check_float_input(logits, "logits");
  TS_CHECK(logits.dim() == 2, "logits must be 2-D [T, E], got shape ", logits.sizes());
  const int64_t experts = logits.size(1);
  TS_CHECK(experts >= 1 && experts <= kMaxExperts, "logits must have 1 to ", kMaxExperts,
           " expert columns, got ", experts);
  TS_CHECK(experts == 1 || logits.stride(1) == 1,
           "logits must be contiguous along the experts (stride(1) == 1), got strides ",
           logits.strides());
  TS_CHECK(top_k >= 1 && top_k <= experts && top_k <= kMaxRoutedExperts, "top_k must be in [1, ",
           std::min(experts, kMaxRoutedExperts), "], got ", top_k);
  if (!forced.has_value()) return;
  const at::Tensor& f = *forced;
  TS_CHECK(f.scalar_type() == at::kInt, "forced must be int32, got ", f.scalar_type());
  TS_CHECK(f.dim() == 2 && f.size(0) == logits.size(0) && f.size(1) == top_k,
           "forced must be [T, top_k] = [", logits.size(0), ", ", top_k, "], got shape ",
           f.sizes());
  check_same_device(logits, "logits", f, "forced");
  if (!validate || f.numel() == 0) return;
  const at::Tensor host = f.cpu().contiguous();
  const int32_t* v = host.const_data_ptr<int32_t>();
  for (int64_t t = 0; t < host.size(0); ++t) {
    const bool free = v[t * top_k] < 0;
    for (int64_t s = 0; s < top_k; ++s) {
      const int32_t id = v[t * top_k + s];
      TS_CHECK(free ? id == -1 : (id >= 0 && id < experts), "forced[", t, ", ", s, "] is ",
               id, ": a row must be all -1 (free) or all in [0, ", experts, ")");
    }
  }
}

void check_moe_dispatch(const at::Tensor& ids, int64_t num_experts, bool validate) {
  TS_CHECK(ids.scalar_type() == at::kInt, "ids must be int32, got ", ids.scalar_type());
  TS_CHECK(ids.dim() == 2, "ids must be 2-D [T, k], got shape ", ids.sizes());
  TS_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts must be in [1, ",
           kMaxExperts, "], got ", num_experts);
  if (!validate || ids.numel() == 0) return;
  const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
  TS_CHECK(lo >= 0 && hi < num_experts, "ids must lie in [0, ", num_experts,
           "), got values in [", lo, ", ", hi, "]");
}

void check_moe_combine(const at::Tensor& expert_out, const at::Tensor& pair_rows,
                       const at::Tensor& weights) {
  check_float_input(expert_out, "expert_out");
  TS_CHECK(expert_out.dim() == 2, "expert_out must be 2-D [T * k, H], got shape ",
           expert_out.sizes());
  TS_CHECK(expert_out.size(1) <= 1 || expert_out.stride(1) == 1,
           "expert_out must be contiguous along H, got strides ", expert_out.strides());
  TS_CHECK(weights.scalar_type() == at::kFloat, "weights must be float32, got ",
           weights.scalar_type());
  TS_CHECK(weights.dim() == 2 && weights.is_contiguous(),
           "weights must be a contiguous [T, k] tensor, got shape ", weights.sizes());
  TS_CHECK(pair_rows.scalar_type() == at::kInt, "pair_rows must be int32, got ",
           pair_rows.scalar_type());
  const int64_t pairs = weights.size(0) * weights.size(1);
  TS_CHECK(pair_rows.dim() == 1 && pair_rows.size(0) == pairs, "pair_rows must be [T * k] = [",
           pairs, "], got shape ", pair_rows.sizes());
  TS_CHECK(expert_out.size(0) == pairs, "expert_out has ", expert_out.size(0),
           " rows but weights name T * k = ", pairs, " pairs");
  check_same_device(expert_out, "expert_out", pair_rows, "pair_rows");
  check_same_device(expert_out, "expert_out", weights, "weights");
}

void check_grouped_gemm(const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& offsets, bool validate) {
  check_float_input(x, "x");
  TS_CHECK(x.dim() == 2, "x must be 2-D [M, K], got shape ", x.sizes());
  TS_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ",
           x.scalar_type(), ", got ", weight.scalar_type());
  TS_CHECK(weight.dim() == 3 && weight.size(2) == x.size(1), "weight must be [E, N, K] with K = ",
           x.size(1), " (x's columns), got shape ", weight.sizes());
  check_index_input(offsets, "offsets");
  const int64_t experts = weight.size(0);
  TS_CHECK(offsets.dim() == 1 && offsets.size(0) == experts + 1, "offsets must be [E + 1] = [",
           experts + 1, "], got shape ", offsets.sizes());
  check_same_device(x, "x", weight, "weight");
  check_same_device(x, "x", offsets, "offsets");
  if (!validate) return;
  const at::Tensor host = offsets.cpu().to(at::kLong).contiguous();
  const int64_t* o = host.const_data_ptr<int64_t>();
  TS_CHECK(o[0] == 0, "offsets[0] must be 0, got ", o[0]);
  for (int64_t e = 0; e < experts; ++e)
    TS_CHECK(o[e + 1] >= o[e], "offsets must be non-decreasing, got offsets[", e + 1, "] = ",
             o[e + 1], " < offsets[", e, "] = ", o[e]);
  TS_CHECK(o[experts] == x.size(0), "offsets[E] must equal x's rows M = ", x.size(0), ", got ",
           o[experts]);
}

}  // namespace tokenspeed
