/*
 * Fused elementwise ops of a decoder layer: rms_norm (with the residual add), silu_and_mul
 * and the neox rotary embedding.
 *
 * Each replaces a chain of torch kernels and keeps that chain's rounding points: every
 * torch op rounds its result to the tensor dtype, so these round at the same places
 * (round_to<T>) and use __fmul_rn/__fadd_rn where nvcc would otherwise contract a multiply
 * and an add into one fma that torch's separate kernels never form. Never written to
 * memory: the fp32 row of rms_norm, silu's result, rotate_half(x) and the dtype cos/sin.
 *
 * Tiling: one block per row (rms_norm: a row of H; silu_and_mul: a token's I outputs;
 * rotary: a token's q and k heads), threads striding over the row in units of VEC
 * elements (16-byte vectors when every row allows it, else VEC = 1). rms_norm reads its
 * row twice (sum of squares, then the scaled output; the second read hits L2) and
 * reduces the sum over the block with warp shuffles and one shared-memory pass.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/dtype.cuh"

namespace tokenspeed {
namespace cuda {
namespace fused {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Pack<T, VEC>& x) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = x;
}

// Element offset of row r of a [N, H] or [N, M, H] tensor (unit stride along H).
struct Rows {
  int64_t m, s0, s1;
  __device__ __forceinline__ int64_t operator()(int64_t r) const {
    return (r / m) * s0 + (r % m) * s1;
  }
};

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < warps; ++w) s += partial[w];
  return s;
}

// x, residual rows by Rows; weight [H]; out, h_out [rows, H] contiguous. One block a row.
template <typename T, int VEC>
__global__ void rms_norm_kernel(const T* __restrict__ x, Rows xr, const T* __restrict__ res,
                                Rows rr, const T* __restrict__ weight, T* __restrict__ out,
                                T* __restrict__ h_out, int64_t h, float inv_h, float eps) {
  const int64_t row = blockIdx.x;
  const T* xrow = x + xr(row);
  const T* rrow = res ? res + rr(row) : nullptr;
  const int64_t stride = int64_t(blockDim.x) * VEC;

  // h = x + residual rounded to T (HF's residual add in the model dtype), or x.
  auto load_h = [&](int64_t c, float (&hv)[VEC]) {
    const Pack<T, VEC> a = load<T, VEC>(xrow + c);
    if (rrow) {
      const Pack<T, VEC> b = load<T, VEC>(rrow + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        hv[i] = to_float(round_to<T>(__fadd_rn(to_float(a.v[i]), to_float(b.v[i]))));
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) hv[i] = to_float(a.v[i]);
    }
  };

  float acc = 0.f;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < h; c += stride) {
    float hv[VEC];
    load_h(c, hv);
    if (h_out) {
      Pack<T, VEC> p;
#pragma unroll
      for (int i = 0; i < VEC; ++i) p.v[i] = round_to<T>(hv[i]);
      store<T, VEC>(h_out + row * h + c, p);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc += hv[i] * hv[i];
  }
  // torch's CUDA mean multiplies by 1/H; its rsqrt is rsqrtf.
  const float rs = rsqrtf(block_sum(acc) * inv_h + eps);

  for (int64_t c = int64_t(threadIdx.x) * VEC; c < h; c += stride) {
    float hv[VEC];
    load_h(c, hv);
    const Pack<T, VEC> w = load<T, VEC>(weight + c);
    Pack<T, VEC> p;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float y = to_float(round_to<T>(__fmul_rn(hv[i], rs)));
      p.v[i] = round_to<T>(__fmul_rn(to_float(w.v[i]), y));
    }
    store<T, VEC>(out + row * h + c, p);
  }
}

// gate_up [rows, 2I] (row stride ld) -> out [rows, I] contiguous. One block a row.
template <typename T, int VEC>
__global__ void silu_and_mul_kernel(const T* __restrict__ gate_up, int64_t ld,
                                    T* __restrict__ out, int64_t inter) {
  const int64_t row = blockIdx.x;
  const T* gate = gate_up + row * ld;
  const T* up = gate + inter;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < inter; c += int64_t(blockDim.x) * VEC) {
    const Pack<T, VEC> g = load<T, VEC>(gate + c), u = load<T, VEC>(up + c);
    Pack<T, VEC> p;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float gf = to_float(g.v[i]);
      const float silu = to_float(round_to<T>(gf / (1.0f + expf(-gf))));
      p.v[i] = round_to<T>(__fmul_rn(silu, to_float(u.v[i])));
    }
    store<T, VEC>(out + row * inter + c, p);
  }
}

// y = x * cos + rotate_half(x) * sin on the pair (x1, x2) = (x[i], x[i + D/2]), with
// cos and sin rounded to T and every product and sum rounded as torch's kernels do.
template <typename T>
__device__ __forceinline__ void rotate_pair(T& x1, T& x2, float c, float s) {
  const float f1 = to_float(x1), f2 = to_float(x2);
  const float a1 = to_float(round_to<T>(__fmul_rn(f1, c)));
  const float b1 = to_float(round_to<T>(__fmul_rn(-f2, s)));
  const float a2 = to_float(round_to<T>(__fmul_rn(f2, c)));
  const float b2 = to_float(round_to<T>(__fmul_rn(f1, s)));
  x1 = round_to<T>(__fadd_rn(a1, b1));
  x2 = round_to<T>(__fadd_rn(a2, b2));
}

// In place on q [N, Hq, D] and k [N, Hk, D] (token strides qs0/ks0, head strides qs1/ks1);
// positions [N] (int32 or int64); cache [max_pos, D] fp32 (cos | sin). One block a token,
// threads over units of VEC consecutive pairs (head, i .. i + VEC - 1 < D/2) of q then k,
// each loading VEC elements of both halves at once. A position outside [0, max_pos)
// leaves its token untouched (the host check reports it).
template <typename T, typename P, int VEC>
__global__ void rotary_kernel(const P* __restrict__ positions, T* q, int64_t qs0, int64_t qs1,
                              int hq, T* k, int64_t ks0, int64_t ks1, int hk,
                              const float* __restrict__ cache, int64_t max_pos, int half) {
  const int64_t token = blockIdx.x;
  const int64_t pos = static_cast<int64_t>(positions[token]);
  if (pos < 0 || pos >= max_pos) return;
  const float* cs = cache + pos * 2 * half;
  const int units_per_head = half / VEC;
  const int units = (hq + hk) * units_per_head;
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    const int head = u / units_per_head, i = (u - head * units_per_head) * VEC;
    T* row = head < hq ? q + token * qs0 + head * qs1 : k + token * ks0 + (head - hq) * ks1;
    Pack<T, VEC> x1 = load<T, VEC>(row + i), x2 = load<T, VEC>(row + i + half);
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      rotate_pair(x1.v[e], x2.v[e], to_float(round_to<T>(cs[i + e])),
                  to_float(round_to<T>(cs[half + i + e])));
    store<T, VEC>(row + i, x1);
    store<T, VEC>(row + i + half, x2);
  }
}

}  // namespace fused
}  // namespace cuda
}  // namespace tokenspeed
