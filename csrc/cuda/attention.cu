// Launchers of paged_prefill_attention's kernels (attention.cuh) behind the plain
// interface of launch.h, and the predicate of the calls each kernel serves. Which kernel
// runs is decided by the host, in attention_host.cpp.
#include <algorithm>
#include <climits>

#include "cuda/attention.cuh"
#include "cuda/launch.h"
#include "cuda/tma_map.h"

namespace tokenspeed {
namespace cuda {
namespace {

// Sets p.kv_tma_rows (keys per TMA box of K/V) and p.kv_tma_pages (pages a box spans) and
// encodes the maps where this call's pages are loaded by TMA; leaves them as they are (0,
// the launcher's) where not. Pages of 64 keys or more that tile a 128-key K/V tile (64,
// 128, 256, ...) come a page (or a tile's 128 keys of a longer page) a box. Smaller pages
// that divide 64 keys into at most 16 (4-32 keys) come 64 keys a box where those pages are
// consecutive in the cache (the kernel checks each half tile): a box per small page loses
// to the cp.async gathers (bench/NOTES.md). Slots are int32 coordinates; the maps must
// encode.
void set_kv_tma(PagedAttnParams& p, DType dtype, int d, CUtensorMap* k_map,
                CUtensorMap* v_map) {
  const int ps = p.page_size;
  static_assert(kSm90Keys == 128, "boxes of 64 keys halve a K/V tile");
  const bool page_boxes = ps % 64 == 0 && (kSm90Keys % ps == 0 || ps % kSm90Keys == 0);
  const bool run_boxes = ps >= 4 && ps < 64 && 64 % ps == 0;
  if (!(page_boxes || run_boxes) || p.cache_slots > INT_MAX || !tma_aligned16(p.k_cache) ||
      !tma_aligned16(p.v_cache))
    return;
  const int rows = run_boxes ? 64 : std::min(ps, kSm90Keys);
  // [slots, Hk, D], innermost first; a box is 64 columns (one swizzle row) of `rows` slots
  const uint64_t dims[3] = {static_cast<uint64_t>(d), static_cast<uint64_t>(p.hk),
                            static_cast<uint64_t>(p.cache_slots)};
  const uint64_t strides[2] = {static_cast<uint64_t>(d) * 2,
                               static_cast<uint64_t>(p.hk) * d * 2};
  const uint32_t box[3] = {64, 1, static_cast<uint32_t>(rows)};
  if (tma_encode_16bit(k_map, p.k_cache, dtype, 3, dims, strides, box) &&
      tma_encode_16bit(v_map, p.v_cache, dtype, 3, dims, strides, box)) {
    p.kv_tma_rows = rows;
    p.kv_tma_pages = run_boxes ? 64 / ps : 1;
  }
}

template <typename T, int D>
cudaError_t launch_wgmma(const PagedAttnParams& params, DType dtype, int b, int tiles,
                         KvLoad kv_load, int32_t* workspace, cudaStream_t stream) {
  PagedAttnParams p = params;
  CUtensorMap k_map{}, v_map{};
  p.kv_tma_rows = p.kv_tma_pages = 0;
  if (kv_load != KvLoad::kCpAsync) set_kv_tma(p, dtype, D, &k_map, &v_map);
  if (kv_load == KvLoad::kTma && p.kv_tma_rows == 0) return cudaErrorNotSupported;
  constexpr int smem = paged_attention_wgmma_smem_bytes<D>();
  auto* kernel = &paged_attention_wgmma_kernel<T, D>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  // persistent: one block per SM walks work items hk x tiles x b (see the kernel)
  int dev = 0, sms = 0;
  const cudaError_t err_sm = cudaGetDevice(&dev) == cudaSuccess
      ? cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) : cudaGetLastError();
  if (err_sm != cudaSuccess) return err_sm;
  const int items = p.hk * tiles * b;  // < 2^31: checked by the caller
  const Sm90Plan plan{workspace, workspace + b + 1};
  sm90_plan_kernel<<<1, kSm90PlanThreads, 0, stream>>>(p.cu_seqlens, b, p.hk, p.group, tiles,
                                                        workspace, plan.counter);
  kernel<<<std::min(items, sms), kSm90Threads, smem, stream>>>(p, k_map, v_map, plan, b);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_mma(const PagedAttnParams& p, int b, int tiles, cudaStream_t stream) {
  constexpr int smem = paged_attention_mma_smem_bytes<D>();
  auto* kernel = &paged_attention_mma_kernel<T, D>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.hk), static_cast<unsigned>(tiles),
                  static_cast<unsigned>(b));
  kernel<<<grid, kAttnThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_simple(const PagedAttnParams& p, const int32_t* req_of, int64_t n,
                          cudaStream_t stream) {
  constexpr int kThreads = 128;
  const int64_t warps = n * p.hq;
  const auto blocks = static_cast<unsigned>((warps * 32 + kThreads - 1) / kThreads);
  paged_attention_simple_kernel<T, kPagedAttentionSimpleMaxDim / 32>
      <<<blocks, kThreads, 0, stream>>>(p, req_of, n);
  return cudaGetLastError();
}

}  // namespace

int paged_attention_rows_per_tile() { return kRowsM; }

// The kernel needs sm_90a machine code (TOKENSPEED_SM90A: the build targets it) and an
// sm_90 device to run it.
bool paged_attention_wgmma_supports(DType dtype, int head_dim) {
  return dtype != DType::kFloat32 && (head_dim == 64 || head_dim == 128) && wgmma::available();
}

cudaError_t launch_paged_attention_wgmma(const PagedAttnParams& p, DType dtype, int batch,
                                         int tiles, KvLoad kv_load, int32_t* plan_workspace,
                                         cudaStream_t stream) {
  const bool bf16 = dtype == DType::kBFloat16;
  if (p.head_dim == 64)
    return bf16 ? launch_wgmma<__nv_bfloat16, 64>(p, dtype, batch, tiles, kv_load,
                                                  plan_workspace, stream)
                : launch_wgmma<__half, 64>(p, dtype, batch, tiles, kv_load, plan_workspace,
                                           stream);
  return bf16 ? launch_wgmma<__nv_bfloat16, 128>(p, dtype, batch, tiles, kv_load,
                                                 plan_workspace, stream)
              : launch_wgmma<__half, 128>(p, dtype, batch, tiles, kv_load, plan_workspace,
                                          stream);
}

bool paged_attention_mma_supports(DType dtype, int head_dim) {
  return dtype != DType::kFloat32 && (head_dim == 64 || head_dim == 128);
}

cudaError_t launch_paged_attention_mma(const PagedAttnParams& p, DType dtype, int batch,
                                       int tiles, cudaStream_t stream) {
  const bool bf16 = dtype == DType::kBFloat16;
  if (p.head_dim == 64)
    return bf16 ? launch_mma<__nv_bfloat16, 64>(p, batch, tiles, stream)
                : launch_mma<__half, 64>(p, batch, tiles, stream);
  return bf16 ? launch_mma<__nv_bfloat16, 128>(p, batch, tiles, stream)
              : launch_mma<__half, 128>(p, batch, tiles, stream);
}

bool paged_attention_simple_supports(DType, int head_dim) {
  return head_dim <= kPagedAttentionSimpleMaxDim;
}

cudaError_t launch_paged_attention_simple(const PagedAttnParams& p, DType dtype,
                                          const int32_t* req_of, int64_t n_tokens,
                                          cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16: return launch_simple<__nv_bfloat16>(p, req_of, n_tokens, stream);
    case DType::kFloat16: return launch_simple<__half>(p, req_of, n_tokens, stream);
    case DType::kFloat32: break;
  }
  return launch_simple<float>(p, req_of, n_tokens, stream);
}

}  // namespace cuda
}  // namespace tokenspeed
