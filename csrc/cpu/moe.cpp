// CPU moe ops: the router (softmax in fp32 + top-k + renormalisation, or forced experts),
// the stable dispatch of (token, slot) pairs by expert, the fp32 combine of each token's
// k expert outputs, and the batch-invariant grouped GEMM of deterministic mode. By default
// the expert GEMMs run between dispatch and combine as plain matmuls over each expert's
// contiguous rows (tokenspeed/layers/moe.py).
//
// Numerics: the router's softmax is exp(x - max) / sum in fp32 (the sum in expert
// order); top-k picks the largest probability first and breaks ties toward the lower
// expert id. The combine accumulates in fp32 over s = 0..k-1 and rounds once. The grouped
// GEMM sums each output element's K products in fp32 in ascending k, rounding once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "moe_checks.h"

namespace tokenspeed::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& logits, int64_t top_k,
                                                 bool renormalize,
                                                 const std::optional<at::Tensor>& forced,
                                                 bool validate) {
  check_moe_route(logits, top_k, forced, validate);
  const int64_t rows = logits.size(0), experts = logits.size(1);
  const at::Tensor x = logits.to(at::kFloat).contiguous();
  const at::Tensor f = forced.has_value() ? forced->contiguous() : at::Tensor();
  at::Tensor weights = at::empty({rows, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({rows, top_k}, logits.options().dtype(at::kInt));
  const float* xp = x.const_data_ptr<float>();
  const int32_t* fp = f.defined() ? f.const_data_ptr<int32_t>() : nullptr;
  float* wp = weights.data_ptr<float>();
  int32_t* ip = ids.data_ptr<int32_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> p(experts);
    for (int64_t t = begin; t < end; ++t) {
      const float* row = xp + t * experts;
      float m = -INFINITY;
      for (int64_t e = 0; e < experts; ++e) m = std::max(m, row[e]);
      float sum = 0.f;
      for (int64_t e = 0; e < experts; ++e) sum += (p[e] = std::exp(row[e] - m));
      for (int64_t e = 0; e < experts; ++e) p[e] /= sum;
      float* w = wp + t * top_k;
      int32_t* id = ip + t * top_k;
      const bool replay = fp != nullptr && fp[t * top_k] >= 0;
      for (int64_t s = 0; s < top_k; ++s) {
        int32_t best = 0;
        if (replay) {
          best = fp[t * top_k + s];
        } else {
          float best_p = -1.f;  // below every probability, including a removed one (-0.5)
          for (int64_t e = 0; e < experts; ++e)
            if (p[e] > best_p) best_p = p[e], best = static_cast<int32_t>(e);
        }
        id[s] = best;
        w[s] = p[best];
        if (!replay) p[best] = -0.5f;
      }
      if (renormalize) {
        float total = 0.f;
        for (int64_t s = 0; s < top_k; ++s) total += w[s];
        for (int64_t s = 0; s < top_k; ++s) w[s] /= total;
      }
    }
  });
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch_cpu(const at::Tensor& ids,
                                                                int64_t num_experts,
                                                                bool validate) {
  check_moe_dispatch(ids, num_experts, validate);
  const at::Tensor flat = ids.contiguous().view(-1);
  const int64_t pairs = flat.numel(), top_k = ids.size(1);
  at::Tensor offsets = at::zeros({num_experts + 1}, ids.options());
  at::Tensor sorted_tokens = at::empty({pairs}, ids.options());
  at::Tensor pair_rows = at::empty({pairs}, ids.options());
  const int32_t* e = flat.const_data_ptr<int32_t>();
  int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t j = 0; j < pairs; ++j) ++off[e[j] + 1];
  for (int64_t x = 0; x < num_experts; ++x) off[x + 1] += off[x];
  // a counting sort: each expert's next free row, filled in pair order (stable)
  std::vector<int32_t> next(off, off + num_experts);
  int32_t* tok = sorted_tokens.data_ptr<int32_t>();
  int32_t* row = pair_rows.data_ptr<int32_t>();
  for (int64_t j = 0; j < pairs; ++j) {
    const int32_t r = next[e[j]]++;
    tok[r] = static_cast<int32_t>(j / top_k);
    row[j] = r;
  }
  return {offsets, sorted_tokens, pair_rows};
}

at::Tensor moe_combine_cpu(const at::Tensor& expert_out, const at::Tensor& pair_rows,
                           const at::Tensor& weights) {
  check_moe_combine(expert_out, pair_rows, weights);
  const int64_t tokens = weights.size(0), top_k = weights.size(1), h = expert_out.size(1);
  at::Tensor out = at::empty({tokens, h}, expert_out.options());
  const at::Tensor y = expert_out.contiguous();
  const at::Tensor rows = pair_rows.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_combine",
                                  [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const int32_t* rp = rows.const_data_ptr<int32_t>();
    const float* wp = weights.const_data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(h);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < top_k; ++s) {
          const float w = wp[t * top_k + s];
          const scalar_t* src = yp + int64_t(rp[t * top_k + s]) * h;
          for (int64_t i = 0; i < h; ++i) acc[i] += w * static_cast<float>(src[i]);
        }
        for (int64_t i = 0; i < h; ++i) op[t * h + i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return out;
}

// Columns summed side by side per row: independent fp32 sums that keep the core busy,
// each still in its own ascending-k order.
constexpr int64_t kGemmCols = 8;

// Rows offsets[e]:offsets[e + 1] of x [M, K] times weight[e]^T ([E, N, K]) -> [M, N].
// out[i, n] = sum over k = 0..K-1, in that order, of x[i, k] * weight[e, n, k] in fp32,
// rounded once: the same whatever M, the row's place and the other rows (batch-invariant).
at::Tensor grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& offsets, bool validate) {
  check_grouped_gemm(x, weight, offsets, validate);
  const int64_t m = x.size(0), k = x.size(1), experts = weight.size(0), n = weight.size(1);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  // Each expert's rows [bounds[e], bounds[e + 1]) clamped into [0, M] and made
  // non-decreasing, so unchecked offsets never reach outside x or out.
  const at::Tensor off = offsets.to(at::kLong).contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  std::vector<int64_t> bounds(experts + 1);
  for (int64_t e = 0; e <= experts; ++e)
    bounds[e] = std::clamp<int64_t>(o[e], e == 0 ? 0 : bounds[e - 1], m);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_gemm",
                                  [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, m, 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // the expert whose rows hold i (none: a row outside every range stays unwritten)
        const int64_t e = std::upper_bound(bounds.begin(), bounds.end(), i) - bounds.begin() - 1;
        if (e < 0 || e >= experts) continue;
        const scalar_t* xr = xp + i * k;
        const scalar_t* we = wp + e * n * k;
        for (int64_t n0 = 0; n0 < n; n0 += kGemmCols) {
          const int64_t cols = std::min(kGemmCols, n - n0);
          float acc[kGemmCols] = {};
          for (int64_t kk = 0; kk < k; ++kk) {
            const float xv = static_cast<float>(xr[kk]);
            for (int64_t j = 0; j < cols; ++j)
              acc[j] += xv * static_cast<float>(we[(n0 + j) * k + kk]);
          }
          for (int64_t j = 0; j < cols; ++j) op[i * n + n0 + j] = static_cast<scalar_t>(acc[j]);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace tokenspeed::cpu

TORCH_LIBRARY_IMPL(tokenspeed, CPU, m) {
  m.impl("moe_route", &tokenspeed::cpu::moe_route_cpu);
  m.impl("moe_dispatch", &tokenspeed::cpu::moe_dispatch_cpu);
  m.impl("moe_combine", &tokenspeed::cpu::moe_combine_cpu);
  m.impl("grouped_gemm", &tokenspeed::cpu::grouped_gemm_cpu);
}
