// CPU paged_prefill_attention: causal GQA attention of each request's new tokens over its
// whole paged K/V sequence, flash-attention style. Fuses the page-table gather, QK^T, the
// causal mask, the softmax and PV; never writes the [n_new, kv_len] score matrix nor a
// de-paged copy of K/V (only a 64-position K/V tile, converted to fp32, in a per-thread
// buffer). Softmax state (running max, running sum) and the output accumulator are fp32,
// updated online per tile.
//
// Work items are (request, kv head, block of 16 new tokens): one item holds the
// 16 * (Hq / Hk) query rows that share a kv head, so every K/V tile it loads serves all
// of them. Items run in parallel with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/cpu_math.h"
#include "op_checks.h"

namespace tokenspeed::cpu {
namespace {

constexpr int64_t kQueryBlock = 16;
constexpr int64_t kKvTile = 64;

struct QueryBlock {
  int64_t request, q_begin, q_end;  // rows of q (global token indices)
  int64_t first_pos;                // kv position of q row q_begin
};

float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename scalar_t>
void attend_block(const QueryBlock& blk, int64_t g, const at::Tensor& q,
                  const scalar_t* k_cache, const scalar_t* v_cache, const int32_t* pages,
                  int64_t page_size, int64_t hk, int64_t ratio, int64_t d, float scale,
                  scalar_t* out, std::vector<float>& scratch) {
  const int64_t nq = blk.q_end - blk.q_begin, rows = nq * ratio;
  scratch.resize(static_cast<size_t>(rows * d * 2 + 2 * kKvTile * d + rows * 2 + kKvTile));
  float* qbuf = scratch.data();        // [rows, D], pre-scaled queries
  float* acc = qbuf + rows * d;        // [rows, D], unnormalised output
  float* kbuf = acc + rows * d;        // [kKvTile, D]
  float* vbuf = kbuf + kKvTile * d;    // [kKvTile, D]
  float* row_max = vbuf + kKvTile * d;  // [rows]
  float* row_sum = row_max + rows;     // [rows]
  float* p = row_sum + rows;           // [kKvTile]

  // Row r is token blk.q_begin + r / ratio, query head g * ratio + r % ratio.
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = qp + (blk.q_begin + r / ratio) * qs0 + (g * ratio + r % ratio) * qs1;
    for (int64_t i = 0; i < d; ++i) qbuf[r * d + i] = to_float(src[i * qs2]) * scale;
    row_max[r] = kNegInf;
    row_sum[r] = 0.0f;
  }
  std::fill(acc, acc + rows * d, 0.0f);

  const int64_t kv_end = blk.first_pos + nq;  // the last row sees positions < kv_end
  for (int64_t t0 = 0; t0 < kv_end; t0 += kKvTile) {
    const int64_t tn = std::min(kKvTile, kv_end - t0);
    for (int64_t j = 0; j < tn; ++j) {
      const int64_t pos = t0 + j;
      const int64_t slot = static_cast<int64_t>(pages[pos / page_size]) * page_size +
                           pos % page_size;
      const scalar_t* ks = k_cache + (slot * hk + g) * d;
      const scalar_t* vs = v_cache + (slot * hk + g) * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        kbuf[j * d + i] = to_float(ks[i]);
        vbuf[j * d + i] = to_float(vs[i]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      // causal: row r sits at position first_pos + r / ratio
      const int64_t visible = std::min(tn, blk.first_pos + r / ratio - t0 + 1);
      if (visible <= 0) continue;
      const float* qr = qbuf + r * d;
      float tile_max = kNegInf;
      for (int64_t j = 0; j < visible; ++j) {
        p[j] = dot(qr, kbuf + j * d, d);
        tile_max = std::max(tile_max, p[j]);
      }
      const float new_max = std::max(row_max[r], tile_max);
      const float alpha = std::exp(row_max[r] - new_max);  // exp(-inf) = 0 on the first tile
      float tile_sum = 0.0f;
      for (int64_t j = 0; j < visible; ++j) {
        p[j] = std::exp(p[j] - new_max);  // one exp per D-long dot product: cheap
        tile_sum += p[j];
      }
      row_max[r] = new_max;
      row_sum[r] = row_sum[r] * alpha + tile_sum;
      float* ar = acc + r * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) ar[i] *= alpha;
      for (int64_t j = 0; j < visible; ++j) {
        const float pj = p[j];
        const float* vj = vbuf + j * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) ar[i] += pj * vj[i];
      }
    }
  }
  // Every row sees at least its own position, so row_sum >= 1.
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* dst = out + ((blk.q_begin + r / ratio) * (hk * ratio) + g * ratio + r % ratio) * d;
    const float inv = 1.0f / row_sum[r];
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(acc[r * d + i] * inv);
  }
}

at::Tensor paged_prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& page_table,
                                       const at::Tensor& cu_seqlens_q, const at::Tensor& kv_lens,
                                       std::optional<double> scale,
                                       std::optional<int64_t> max_seqlen_q, bool validate) {
  check_paged_attention(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, scale,
                        max_seqlen_q, validate);
  const int64_t hq = q.size(1), d = q.size(2), hk = k_cache.size(2);
  const int64_t page_size = k_cache.size(1), ratio = hq / hk, b = page_table.size(0);
  const float sm_scale = attention_scale(scale, d);
  at::Tensor out = at::empty({q.size(0), hq, d}, q.options());
  if (q.size(0) == 0 || d == 0) return out;

  const at::Tensor cu_c = cu_seqlens_q.contiguous(), lens_c = kv_lens.contiguous();
  const int32_t* cu = cu_c.const_data_ptr<int32_t>();
  const int32_t* lens = lens_c.const_data_ptr<int32_t>();
  std::vector<QueryBlock> blocks;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t n_new = cu[i + 1] - cu[i];
    for (int64_t q0 = 0; q0 < n_new; q0 += kQueryBlock)
      blocks.push_back({i, cu[i] + q0, cu[i] + std::min(n_new, q0 + kQueryBlock),
                        lens[i] - n_new + q0});
  }
  const int32_t* pt = page_table.const_data_ptr<int32_t>();
  const int64_t pt_stride = page_table.stride(0);
  const int64_t items = static_cast<int64_t>(blocks.size()) * hk;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "tokenspeed_paged_prefill_attention", [&] {
        const scalar_t* kc = k_cache.const_data_ptr<scalar_t>();
        const scalar_t* vc = v_cache.const_data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> scratch;
          for (int64_t it = begin; it < end; ++it) {
            const QueryBlock& blk = blocks[it / hk];
            attend_block<scalar_t>(blk, it % hk, q, kc, vc, pt + blk.request * pt_stride,
                                   page_size, hk, ratio, d, sm_scale, o, scratch);
          }
        });
      });
  return out;
}

}  // namespace
}  // namespace tokenspeed::cpu

TORCH_LIBRARY_IMPL(tokenspeed, CPU, m) {
  m.impl("paged_prefill_attention", &tokenspeed::cpu::paged_prefill_attention_cpu);
}
