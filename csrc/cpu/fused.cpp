// CPU kernels of the fused decoder-layer elementwise ops: rms_norm (with the residual
// add), silu_and_mul and rotary_embedding. Each reproduces the rounding points of the
// torch composition the models used before (and HF uses): every torch op rounds its
// result to the tensor dtype, so the kernels round at the same places (T(...) below) and
// compute everything between two such points in fp32. Never writes an intermediate
// tensor; rms_norm keeps one row of fp32 h in a per-thread buffer between its two passes.
// Parallel over rows (tokens) with at::parallel_for.
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

// Element offset of row r of a [N, H] or [N, M, H] tensor (unit stride along H).
struct RowIndex {
  int64_t m, s0, s1;
  explicit RowIndex(const at::Tensor& t)
      : m(t.dim() == 3 ? t.size(1) : 1), s0(t.stride(0)), s1(t.dim() == 3 ? t.stride(1) : 0) {}
  int64_t operator()(int64_t r) const { return (r / m) * s0 + (r % m) * s1; }
};

// Rows per task so that a task touches about 64 KB.
int64_t grain_for(int64_t row_elems) {
  return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(row_elems, 1));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                double eps,
                                                const std::optional<at::Tensor>& residual) {
  check_rms_norm(x, weight, eps, residual);
  const bool has_res = residual.has_value();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor h_out = has_res ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const int64_t h = x.size(-1), rows = x.numel() / h;
  if (rows == 0) return {out, h_out};
  const RowIndex xi(x);
  const RowIndex ri(has_res ? *residual : x);
  const float epsf = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const T* rp = has_res ? residual->const_data_ptr<T>() : nullptr;
    const T* wp = weight.const_data_ptr<T>();
    T* op = out.data_ptr<T>();
    T* hp = has_res ? h_out.data_ptr<T>() : nullptr;
    at::parallel_for(0, rows, grain_for(h), [&](int64_t begin, int64_t end) {
      std::vector<float> hf(h);
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = xp + xi(r);
        // h in the dtype (HF's residual add), then squared and summed in fp32 over
        // kLanes interleaved partial sums.
        float acc[kLanes] = {};
        for (int64_t j = 0; j < h; ++j) {
          float v = to_float(xr[j]);
          if (rp) {
            const T hv = T(v + to_float(rp[ri(r) + j]));
            hp[r * h + j] = hv;
            v = to_float(hv);
          }
          hf[j] = v;
          acc[j % kLanes] += v * v;
        }
        float sum = 0.0f;
        for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
        // torch's CPU mean divides the sum; its rsqrt is 1 / sqrt.
        const float rs = 1.0f / std::sqrt(sum / static_cast<float>(h) + epsf);
        T* orow = op + r * h;
        for (int64_t j = 0; j < h; ++j)
          orow[j] = T(to_float(wp[j]) * to_float(T(hf[j] * rs)));
      }
    });
  });
  return {out, h_out};
}

at::Tensor silu_and_mul_cpu(const at::Tensor& gate_up) {
  check_silu_and_mul(gate_up);
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({n, inter}, gate_up.options());
  if (n == 0 || inter == 0) return out;
  const int64_t ld = gate_up.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(),
                                  "silu_and_mul", [&] {
    using T = scalar_t;
    const T* src = gate_up.const_data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, n, grain_for(2 * inter), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* gate = src + r * ld;
        const T* up = gate + inter;
        T* o = dst + r * inter;
        for (int64_t j = 0; j < inter; ++j) {
          const float g = to_float(gate[j]);
          const T silu = T(g / (1.0f + std::exp(-g)));
          o[j] = T(to_float(silu) * to_float(up[j]));
        }
      }
    });
  });
  return out;
}

// Rotates the heads [H, D] of one token (head stride hs) by the dtype-rounded cos/sin.
template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t hs, int64_t half, const float* cos,
                  const float* sin) {
  for (int64_t hd = 0; hd < heads; ++hd) {
    T* row = x + hd * hs;
    for (int64_t i = 0; i < half; ++i) {
      const float c = to_float(T(cos[i])), s = to_float(T(sin[i]));
      const float x1 = to_float(row[i]), x2 = to_float(row[i + half]);
      // x * cos + rotate_half(x) * sin: two rounded products and a rounded sum.
      const T y1 = T(to_float(T(x1 * c)) + to_float(T(-x2 * s)));
      const T y2 = T(to_float(T(x2 * c)) + to_float(T(x1 * s)));
      row[i] = y1;
      row[i + half] = y2;
    }
  }
}

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& q, at::Tensor& k,
                          const at::Tensor& cos_sin_cache, bool validate) {
  check_rotary_embedding(positions, q, k, cos_sin_cache, validate);
  const int64_t n = q.size(0), d = q.size(2), half = d / 2;
  if (n == 0) return;
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const float* cache = cos_sin_cache.const_data_ptr<float>();
  const int64_t max_pos = cos_sin_cache.size(0);
  const int64_t hq = q.size(1), hk = k.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "rotary_embedding", [&] {
    using T = scalar_t;
    T* qp = q.data_ptr<T>();
    T* kp = k.data_ptr<T>();
    at::parallel_for(0, n, grain_for((hq + hk) * d), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        // Unvalidated out-of-range positions leave their token untouched.
        if (pp[t] < 0 || pp[t] >= max_pos) continue;
        const float* cs = cache + pp[t] * d;
        rotate_heads(qp + t * q.stride(0), hq, q.stride(1), half, cs, cs + half);
        rotate_heads(kp + t * k.stride(0), hk, k.stride(1), half, cs, cs + half);
      }
    });
  });
}

}  // namespace
}  // namespace tokenspeed::cpu

TORCH_LIBRARY_IMPL(tokenspeed, CPU, m) {
  m.impl("rms_norm", &tokenspeed::cpu::rms_norm_cpu);
  m.impl("silu_and_mul", &tokenspeed::cpu::silu_and_mul_cpu);
  m.impl("rotary_embedding", &tokenspeed::cpu::rotary_embedding_cpu);
}
