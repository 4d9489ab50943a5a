// CUDA host side of the fused decoder-layer ops (rms_norm, silu_and_mul,
// rotary_embedding): argument checks, device guard, output allocation, the choice of
// 16-byte or scalar units, and error reporting over the launch functions of launch.h
// (kernels in fused.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "cuda/host_utils.h"
#include "cuda/launch.h"
#include "op_checks.h"

namespace tokenspeed::cuda {
namespace {

// Rows of t ([N, H] or [N, M, H]) all start on a 16-byte boundary and hold whole units.
bool rows_allow_vec16(const at::Tensor& t) {
  const int64_t elems = 16 / static_cast<int64_t>(t.element_size());
  if (!aligned16(t) || t.size(-1) % elems != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % elems != 0) return false;
  return true;
}

RowLayout layout_of(const at::Tensor& t) {
  if (t.dim() == 3) return RowLayout{t.size(1), t.stride(0), t.stride(1)};
  return RowLayout{1, t.stride(0), 0};
}

void check_grid(int64_t rows, const char* what) {
  TS_CHECK(rows <= std::numeric_limits<int32_t>::max(), what, " has ", rows,
           " rows, more than one launch handles");
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 double eps,
                                                 const std::optional<at::Tensor>& residual) {
  check_rms_norm(x, weight, eps, residual);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_res = residual.has_value();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor h_out = has_res ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const int64_t h = x.size(-1), rows = x.numel() / h;
  if (rows == 0) return {out, h_out};
  check_grid(rows, "x");
  const bool vec16 = rows_allow_vec16(x) && rows_allow_vec16(out) &&
                     aligned16(weight) &&
                     (!has_res || (rows_allow_vec16(*residual) && rows_allow_vec16(h_out)));
  C10_CUDA_CHECK(launch_rms_norm(
      x.const_data_ptr(), layout_of(x), has_res ? residual->const_data_ptr() : nullptr,
      layout_of(has_res ? *residual : x), weight.const_data_ptr(), out.data_ptr(),
      has_res ? h_out.data_ptr() : nullptr, dtype_of(x), rows, h, static_cast<float>(eps),
      vec16, c10::cuda::getCurrentCUDAStream()));
  return {out, h_out};
}

at::Tensor silu_and_mul_cuda(const at::Tensor& gate_up) {
  check_silu_and_mul(gate_up);
  check_cuda(gate_up, "gate_up");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({n, inter}, gate_up.options());
  if (n == 0 || inter == 0) return out;
  check_grid(n, "gate_up");
  // The up half starts inter elements into each row, so inter must hold whole units too.
  const int64_t elems = 16 / static_cast<int64_t>(gate_up.element_size());
  const bool vec16 = rows_allow_vec16(gate_up) && inter % elems == 0 && rows_allow_vec16(out);
  const int64_t ld = n > 1 ? gate_up.stride(0) : 2 * inter;
  C10_CUDA_CHECK(launch_silu_and_mul(gate_up.const_data_ptr(), ld, out.data_ptr(),
                                     dtype_of(gate_up), n, inter, vec16,
                                     c10::cuda::getCurrentCUDAStream()));
  return out;
}

// With validate, the range check (a host round trip) runs before the launch, so a
// rejected call leaves q and k as they were; without it, a token whose position is out
// of range is left untouched by the kernel.
void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& q, at::Tensor& k,
                           const at::Tensor& cos_sin_cache, bool validate) {
  check_rotary_embedding(positions, q, k, cos_sin_cache, validate);
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t n = q.size(0), hq = q.size(1), hk = k.size(1), d = q.size(2);
  if (n == 0) return;
  check_grid(n, "q");
  TS_CHECK((hq + hk) * (d / 2) <= std::numeric_limits<int32_t>::max(),
           "q and k have too many heads for one launch");
  const at::Tensor pos = positions.contiguous();
  // 16-byte units when both halves of every head row start on 16-byte boundaries
  const int64_t elems = 16 / static_cast<int64_t>(q.element_size());
  const bool vec16 = (d / 2) % elems == 0 && rows_allow_vec16(q) && rows_allow_vec16(k);
  C10_CUDA_CHECK(launch_rotary_embedding(
      pos.const_data_ptr(), pos.scalar_type() == at::kLong, q.data_ptr(), q.stride(0),
      q.stride(1), static_cast<int>(hq), k.data_ptr(), k.stride(0), k.stride(1),
      static_cast<int>(hk), cos_sin_cache.const_data_ptr<float>(), cos_sin_cache.size(0),
      static_cast<int>(d / 2), dtype_of(q), n, vec16, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace tokenspeed::cuda

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) {
  m.impl("rms_norm", &tokenspeed::cuda::rms_norm_cuda);
  m.impl("silu_and_mul", &tokenspeed::cuda::silu_and_mul_cuda);
  m.impl("rotary_embedding", &tokenspeed::cuda::rotary_embedding_cuda);
}
