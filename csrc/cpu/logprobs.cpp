// CPU log-prob kernels: logprobs, logprob_partials, head_logprob_partials (the same partials
// of the LM head's product), combine_logprob_partials, and for
// the sampler outputs logprob_topk_partials (the same row state plus the row's k largest
// x, taken in the same read of the row) and logprob_mass_above (a second pass).
//
// Fuses temperature scaling, the log-sum-exp, the target gather and the entropy into one
// read of each logits row; never writes [T, V] nor any fp32 copy of a row (a 512-column
// block is converted into a stack buffer that stays in L1). Every row runs through one
// routine, row_state(), which returns the shard state (m, s, w, t) of the design doc;
// logprobs finalises it directly and the partials op returns it, so a single-shard
// combine reproduces logprobs bit for bit. Parallel over rows with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/cpu_math.h"
#include "kept_set.h"
#include "op_checks.h"

namespace tokenspeed::cpu {
namespace {

// x = logits / temperature. m = max x, s = sum exp(x - m), w = sum exp(x - m) * (x - m),
// t = x[target] (-inf when the target lies outside this row). fp32 throughout.
struct RowState {
  float m, s, w, t;
};

constexpr int64_t kBlock = 512;

// The on_block of the ops that need nothing but the row state.
constexpr auto kNoBlockFn = [](auto&&...) {};

// Max of buf[0, n) after padding it with -inf to whole vectors. Built for AVX2 too, as
// the 8-lane select only becomes a single instruction there.
__attribute__((target_clones("avx2", "default")))
float padded_block_max(float* __restrict__ buf, int64_t n) {
  for (int64_t i = n; i % kLanes != 0; ++i) buf[i] = kNegInf;
  vfloat bm = vsplat(kNegInf);
  for (int64_t i = 0; i < n; i += kLanes) bm = vmax(bm, vload(buf + i));
  return hmax(bm);
}

// Converts one block to scaled fp32 in `buf` and returns its max.
template <typename scalar_t>
float load_block(const scalar_t* __restrict__ src, int64_t n, float inv_temp,
                 float* __restrict__ buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = to_float(src[i]) * inv_temp;
  return padded_block_max(buf, n);
}

// Adds the block's sum exp(x - m) and sum exp(x - m) * (x - m) to s, w. The clamp turns
// -inf logits (and the padding) into exp = 0 times a finite value: they add nothing.
// Two accumulators per sum hide the add latency.
__attribute__((target_clones("avx2", "default")))
void accumulate_block(const float* __restrict__ buf, int64_t n, float m, float& s, float& w) {
  const vfloat vm = vsplat(m);
  vfloat s0{}, s1{}, w0{}, w1{};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const vfloat d0 = clamp_exp_arg(vload(buf + i) - vm);
    const vfloat d1 = clamp_exp_arg(vload(buf + i + kLanes) - vm);
    const vfloat e0 = exp_clamped(d0), e1 = exp_clamped(d1);
    s0 += e0;
    s1 += e1;
    w0 += e0 * d0;
    w1 += e1 * d1;
  }
  for (; i < n; i += kLanes) {  // the -inf padding completes the last vector
    const vfloat d0 = clamp_exp_arg(vload(buf + i) - vm);
    const vfloat e0 = exp_clamped(d0);
    s0 += e0;
    w0 += e0 * d0;
  }
  s += hsum(s0 + s1);
  w += hsum(w0 + w1);
}

// One pass over a row with online rescaling: when the running max moves from m to
// m' > m, every term exp(x - m) gains a = exp(m - m') and every (x - m) gains
// delta = m - m', so s' = a * s and w' = a * (w + s * delta). on_block(x, j0, n) sees
// each block's scaled values x[0, n) (columns j0 ..) while they are in L1.
template <typename scalar_t, typename BlockFn>
RowState row_state(const scalar_t* row, int64_t v, float inv_temp, int64_t target,
                   BlockFn&& on_block) {
  alignas(64) float buf[kBlock];
  float m = kNegInf, s = 0.0f, w = 0.0f;
  for (int64_t j0 = 0; j0 < v; j0 += kBlock) {
    const int64_t n = std::min(kBlock, v - j0);
    const float bm = load_block(row + j0, n, inv_temp, buf);
    on_block(static_cast<const float*>(buf), j0, n);
    if (bm == kNegInf) continue;  // an all -inf block adds nothing
    if (bm > m) {
      if (m != kNegInf) {
        const float delta = m - bm;
        const float a = std::exp(delta);
        w = a * (w + s * delta);
        s = a * s;
      }
      m = bm;
    }
    accumulate_block(buf, n, m, s, w);
  }
  const float t = (target >= 0 && target < v) ? to_float(row[target]) * inv_temp : kNegInf;
  return {m, s, w, t};
}

// logprob = t - m - log s, entropy = log s - w / s; nan for a row with no finite logit.
std::pair<float, float> finalize(const RowState& st) {
  if (st.m == kNegInf) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    return {nan, nan};
  }
  const float log_s = std::log(st.s);
  return {st.t - st.m - log_s, log_s - st.w / st.s};
}

// Calls fn(row, RowState) for every row in parallel; targets are shifted by -offset.
// on_block(row, x, j0, n) sees every block of scaled values on the way (row_state).
template <typename Fn, typename BlockFn>
void for_each_row_state(const at::Tensor& logits, const at::Tensor& targets, int64_t offset,
                        double temperature, Fn&& fn, BlockFn&& on_block) {
  const int64_t t_rows = logits.size(0), v = logits.size(1);
  const int64_t row_stride = logits.stride(0);
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const at::Tensor tg = targets.to(at::kLong).contiguous();
  const int64_t* tgt = tg.data_ptr<int64_t>();
  // enough rows per task to amortise the fork for short rows
  const int64_t grain = std::max<int64_t>(1, 16384 / v);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "tokenspeed_row_state", [&] {
        const scalar_t* base = logits.const_data_ptr<scalar_t>();
        at::parallel_for(0, t_rows, grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r)
            fn(r, row_state(base + r * row_stride, v, inv_temp, tgt[r] - offset,
                            [&](const float* x, int64_t j0, int64_t n) {
                              on_block(r, x, j0, n);
                            }));
        });
      });
}

std::tuple<at::Tensor, at::Tensor> logprobs_cpu(const at::Tensor& logits,
                                                const at::Tensor& targets, double temperature,
                                                bool return_entropy, bool validate) {
  check_logits_targets(logits, targets);
  check_temperature(temperature);
  if (validate) check_target_range(targets, 0, logits.size(1));
  const int64_t t_rows = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({t_rows}, f32);
  at::Tensor ent = at::empty({return_entropy ? t_rows : 0}, f32);
  float* lp_p = lp.data_ptr<float>();
  float* ent_p = return_entropy ? ent.data_ptr<float>() : nullptr;
  for_each_row_state(
      logits, targets, 0, temperature,
      [&](int64_t r, const RowState& st) {
        const auto [l, e] = finalize(st);
        lp_p[r] = l;
        if (ent_p != nullptr) ent_p[r] = e;
      },
      kNoBlockFn);
  return {lp, ent};
}

// The partials [T, 4] of a shard; on_block as in for_each_row_state.
template <typename BlockFn>
at::Tensor shard_partials(const at::Tensor& logits, const at::Tensor& targets,
                          int64_t vocab_start, double temperature, bool validate,
                          BlockFn&& on_block) {
  check_logits_targets(logits, targets);
  check_temperature(temperature);
  check_vocab_start(vocab_start);
  if (validate) check_target_range(targets, 0, -1);
  at::Tensor out = at::empty({logits.size(0), 4}, logits.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for_each_row_state(
      logits, targets, vocab_start, temperature,
      [&](int64_t r, const RowState& st) {
        o[4 * r + 0] = st.m;
        o[4 * r + 1] = st.s;
        o[4 * r + 2] = st.w;
        o[4 * r + 3] = st.t;
      },
      on_block);
  return out;
}

at::Tensor logprob_partials_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                int64_t vocab_start, double temperature, bool validate) {
  return shard_partials(logits, targets, vocab_start, temperature, validate, kNoBlockFn);
}

// The product in fp32 (16-bit operands widened first, so every product is exact), a bounded
// block of rows at a time, each block's rows through row_state as logprob_partials does;
// with batch_invariant the last block zero-padded to the others' rows (the GEMM's blocking
// follows the shape).
at::Tensor head_logprob_partials_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& targets, int64_t vocab_start,
                                     double temperature, bool validate, bool batch_invariant) {
  check_head_inputs(hidden, weight, targets);
  check_temperature(temperature);
  check_vocab_start(vocab_start);
  if (validate) check_target_range(targets, 0, -1);
  const int64_t rows = hidden.size(0), v = weight.size(0);
  at::Tensor out = at::empty({rows, 4}, hidden.options().dtype(at::kFloat));
  const at::Tensor w = weight.to(at::kFloat);
  const int64_t step = std::max<int64_t>(1, (int64_t(1) << 22) / v);
  for (int64_t r = 0; r < rows; r += step) {
    const int64_t n = std::min(step, rows - r);
    at::Tensor block = hidden.narrow(0, r, n).to(at::kFloat);
    if (batch_invariant && n < step) block = at::constant_pad_nd(block, {0, 0, 0, step - n});
    const at::Tensor logits = at::mm(block, w.t()).narrow(0, 0, n);
    out.narrow(0, r, n).copy_(shard_partials(logits, targets.narrow(0, r, n), vocab_start,
                                             temperature, false, kNoBlockFn));
  }
  return out;
}

// Adds a block of x (columns j0 ..) to a row's k largest, kept descending in vals/ids with
// n of k places filled; ties go to the lower column, as columns arrive in ascending
// order and a later equal value never displaces an earlier one. Nan is never a candidate.
void add_topk(const float* x, int64_t j0, int64_t count, int64_t k, float* vals, int64_t* ids,
              int64_t& n) {
  for (int64_t c = 0; c < count; ++c) {
    const float xv = x[c];
    if (xv != xv || (n == k && !(xv > vals[k - 1]))) continue;
    int64_t i = n < k ? n++ : k - 1;
    for (; i > 0 && vals[i - 1] < xv; --i) {
      vals[i] = vals[i - 1];
      ids[i] = ids[i - 1];
    }
    vals[i] = xv;
    ids[i] = j0 + c;
  }
}

// The partials and each row's k largest x from the same read of the row (add_topk on
// every block row_state loads). Unfilled places keep (-inf, -1); ids become global.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_topk_partials_cpu(
    const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
    double temperature, int64_t k, bool validate) {
  check_logits_targets(logits, targets);
  check_topk(k);
  const int64_t t_rows = logits.size(0);
  at::Tensor vals = at::full({t_rows, k}, kNegInf, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::full({t_rows, k}, -1, logits.options().dtype(at::kLong));
  std::vector<int64_t> filled(t_rows, 0);
  float* vp = vals.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::Tensor parts = shard_partials(
      logits, targets, vocab_start, temperature, validate,
      [&](int64_t r, const float* x, int64_t j0, int64_t n) {
        add_topk(x, j0, n, k, vp + r * k, ip + r * k, filled[r]);
      });
  return {parts, vals, at::where(ids >= 0, ids + vocab_start, ids)};
}

// Each x lands in the bin of the largest threshold <= x (thresholds sorted per row), and
// the suffix sums of the bins give every threshold's mass at once. Sums in double.
at::Tensor logprob_mass_above_cpu(const at::Tensor& logits, double temperature,
                                  const at::Tensor& thresholds, const at::Tensor& ref_m) {
  check_mass_above(logits, thresholds, ref_m);
  check_temperature(temperature);
  const int64_t t_rows = logits.size(0), v = logits.size(1), row_stride = logits.stride(0);
  const int64_t n = thresholds.size(1);
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const at::Tensor th = thresholds.contiguous(), rm = ref_m.contiguous();
  at::Tensor out = at::zeros({t_rows, n, 2}, logits.options().dtype(at::kFloat));
  const float* thp = th.const_data_ptr<float>();
  const float* rmp = rm.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "tokenspeed_mass_above", [&] {
        const scalar_t* base = logits.const_data_ptr<scalar_t>();
        at::parallel_for(0, t_rows, 1, [&](int64_t b, int64_t e) {
          std::vector<std::pair<float, int64_t>> sorted;
          std::vector<double> bin_s, bin_w;
          for (int64_t r = b; r < e; ++r) {
            sorted.clear();
            for (int64_t i = 0; i < n; ++i)  // a nan threshold keeps nothing: mass 0
              if (thp[r * n + i] == thp[r * n + i]) sorted.emplace_back(thp[r * n + i], i);
            std::sort(sorted.begin(), sorted.end());
            bin_s.assign(sorted.size(), 0.0);
            bin_w.assign(sorted.size(), 0.0);
            const scalar_t* row = base + r * row_stride;
            const double m = rmp[r];
            for (int64_t j = 0; j < v; ++j) {
              const float x = to_float(row[j]) * inv_temp;
              if (x == kNegInf || x != x) continue;
              const auto it = std::upper_bound(sorted.begin(), sorted.end(),
                                               std::make_pair(x, INT64_MAX));
              if (it == sorted.begin()) continue;
              const auto bin = (it - sorted.begin()) - 1;
              const double d = double(x) - m, p = std::exp(d);
              bin_s[bin] += p;
              bin_w[bin] += p * d;
            }
            double s = 0.0, w = 0.0;
            for (int64_t i = int64_t(sorted.size()) - 1; i >= 0; --i) {
              s += bin_s[i];
              w += bin_w[i];
              float* dst = o + (r * n + sorted[i].second) * 2;
              dst[0] = static_cast<float>(s);
              dst[1] = static_cast<float>(w);
            }
          }
        });
      });
  return out;
}

// Shard i's state moves to the global max M with scale_i = exp(m_i - M) and
// shift_i = m_i - M: S = sum s_i scale_i, W = sum (w_i + s_i shift_i) scale_i, summed in
// shard order so the result does not depend on how the vocabulary was split. One shard
// gives scale 1 and shift 0 exactly, i.e. logprobs' own state.
std::tuple<at::Tensor, at::Tensor> combine_logprob_partials_cpu(const at::Tensor& partials) {
  check_partials(partials);
  const at::Tensor p = partials.contiguous();
  const int64_t shards = p.size(0), t_rows = p.size(1);
  const auto f32 = p.options();
  at::Tensor lp = at::empty({t_rows}, f32), ent = at::empty({t_rows}, f32);
  const float* in = p.const_data_ptr<float>();
  float* lp_p = lp.data_ptr<float>();
  float* ent_p = ent.data_ptr<float>();
  at::parallel_for(0, t_rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      RowState g{kNegInf, 0.0f, 0.0f, kNegInf};
      for (int64_t i = 0; i < shards; ++i) g.m = std::max(g.m, in[(i * t_rows + r) * 4]);
      if (g.m != kNegInf) {
        for (int64_t i = 0; i < shards; ++i) {
          const float* st = in + (i * t_rows + r) * 4;
          if (st[0] == kNegInf) {
            g.t = std::max(g.t, st[3]);
            continue;
          }
          const float shift = st[0] - g.m;
          const float scale = std::exp(shift);
          g.s += st[1] * scale;
          g.w += (st[2] + st[1] * shift) * scale;
          g.t = std::max(g.t, st[3]);
        }
      }
      const auto [l, e] = finalize(g);
      lp_p[r] = l;
      ent_p[r] = e;
    }
  });
  return {lp, ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_kept_set_cpu(
    const at::Tensor& values, const at::Tensor& ids, const at::Tensor& ref_m,
    const at::Tensor& big_s, const at::Tensor& big_w, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p,
    const std::optional<at::Tensor>& pass_mass) {
  check_kept_set(values, ids, ref_m, big_s, big_w, top_k, top_p, min_p, pass_mass);
  const at::Tensor pass = pass_mass.has_value() ? pass_mass->contiguous() : at::Tensor();
  const float* pp = pass.defined() ? pass.const_data_ptr<float>() : nullptr;
  const int64_t rows = values.size(0), kc = values.size(1);
  const at::Tensor v = values.contiguous(), i = ids.contiguous(), rm = ref_m.contiguous(),
                   s = big_s.contiguous(), w = big_w.contiguous(), tk = top_k.contiguous(),
                   tp = top_p.contiguous(), mp = min_p.contiguous();
  at::Tensor tau = at::empty({rows}, values.options()), s_kept = at::empty_like(tau),
             w_kept = at::empty_like(tau),
             pending = at::empty({rows}, values.options().dtype(at::kBool));
  const float *vp = v.const_data_ptr<float>(), *rmp = rm.const_data_ptr<float>(),
              *sp = s.const_data_ptr<float>(), *wp = w.const_data_ptr<float>(),
              *tpp = tp.const_data_ptr<float>(), *mpp = mp.const_data_ptr<float>();
  const int64_t *ip = i.const_data_ptr<int64_t>(), *tkp = tk.const_data_ptr<int64_t>();
  float *tau_p = tau.data_ptr<float>(), *s_out = s_kept.data_ptr<float>(),
        *w_out = w_kept.data_ptr<float>();
  bool* pend = pending.data_ptr<bool>();
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const KeptSet out = kept_set_row(vp + r * kc, ip + r * kc, static_cast<int>(kc), rmp[r],
                                       sp[r], wp[r], tkp[r], tpp[r], mpp[r],
                                       pp != nullptr ? pp[2 * r] : NAN,
                                       pp != nullptr ? pp[2 * r + 1] : NAN);
      tau_p[r] = out.tau;
      s_out[r] = out.s;
      w_out[r] = out.w;
      pend[r] = out.pending;
    }
  });
  return {tau, s_kept, w_kept, pending};
}

}  // namespace
}  // namespace tokenspeed::cpu

TORCH_LIBRARY_IMPL(tokenspeed, CPU, m) {
  m.impl("logprobs", &tokenspeed::cpu::logprobs_cpu);
  m.impl("logprob_partials", &tokenspeed::cpu::logprob_partials_cpu);
  m.impl("head_logprob_partials", &tokenspeed::cpu::head_logprob_partials_cpu);
  m.impl("combine_logprob_partials", &tokenspeed::cpu::combine_logprob_partials_cpu);
  m.impl("logprob_topk_partials", &tokenspeed::cpu::logprob_topk_partials_cpu);
  m.impl("logprob_mass_above", &tokenspeed::cpu::logprob_mass_above_cpu);
  m.impl("filter_kept_set", &tokenspeed::cpu::filter_kept_set_cpu);
}
