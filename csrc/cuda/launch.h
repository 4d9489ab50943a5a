// The boundary between the host code compiled by g++ (<family>_host.cpp: argument checks,
// device guard, allocation, errors, registration) and the kernels compiled by nvcc
// (<family>.cu): plain functions over raw pointers that launch on a given stream and
// return the launch's cudaError_t. Nothing here throws, and no .cu file includes ATen or
// torch, so every exception is thrown and unwound in host-compiled code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tokenspeed {
namespace cuda {

enum class DType : int { kFloat32, kBFloat16, kFloat16 };

// ---- logprobs: the log-prob ops (logprobs.cu) ----

// Number of fixed vocabulary chunks a row of V columns of `dtype` is split into, and the
// threads of each chunk's block (one thread max each for launch_row_topk).
int64_t logprob_num_chunks(int64_t V, DType dtype);
constexpr int kLogprobChunkThreads = 256;

// Per-chunk states [rows, C, 4] fp32 (m, s, w, t; m and t in logit units) of
// logits [rows, V] (row stride ld elements, unit column stride). targets [rows] int32 or
// int64 (element stride targets_stride), global ids; the shard starts at vocab_start.
// thread_maxima != nullptr: also each chunk thread's max logit into it, [rows, C, 256]
// fp32, for launch_row_topk.
cudaError_t launch_logprob_chunks(const void* logits, DType dtype, int64_t rows, int64_t ld,
                                  int64_t V, const void* targets, bool targets_int64,
                                  int64_t targets_stride, int64_t vocab_start, float inv_temp,
                                  float* state, float* thread_maxima, cudaStream_t stream);

// Each row's k (<= 64) largest x = logit * inv_temp, descending, ties to the lower id, into
// vals [rows, k] fp32 and ids [rows, k] int64 (global ids, vocab_start + column; -inf and
// -1 past the row), from the thread maxima launch_logprob_chunks wrote for the same
// logits and a few of their vectors.
cudaError_t launch_row_topk(const void* logits, DType dtype, int64_t rows, int64_t ld,
                            int64_t V, const float* thread_maxima, float inv_temp, int k,
                            int64_t vocab_start, float* vals, int64_t* ids,
                            cudaStream_t stream);

// out [rows, n, 2] fp32: over x = logit * inv_temp >= thresholds[r, i] (thresholds
// [rows, n] fp32 contiguous, n <= 256), sum e^(x - ref_m[r]) and e^(x - ref_m[r]) (x -
// ref_m[r]). logits [rows, V] with row stride ld.
cudaError_t launch_mass_above(const void* logits, DType dtype, int64_t rows, int64_t ld,
                              int64_t V, float inv_temp, const float* thresholds, int64_t n,
                              const float* ref_m, float* out, cudaStream_t stream);

// filter_kept_set over rows (every pointer contiguous [rows] or [rows, kc], pass [rows, 2]
// or nullptr; kept_set.h).
cudaError_t launch_kept_set(const float* values, const int64_t* ids, int64_t rows, int kc,
                            const float* ref_m, const float* big_s, const float* big_w,
                            const int64_t* top_k, const float* top_p, const float* min_p,
                            const float* pass, float* tau, float* s_kept, float* w_kept,
                            bool* pending, cudaStream_t stream);

// Ordered merge of n fp32 states per row (row r's item i at
// states[(r * row_stride + i * item_stride) * 4]). Writes either merged [rows, 4] (scaled
// by inv_temp) or lp [rows] and, when ent != nullptr, ent [rows].
cudaError_t launch_merge_states(const float* states, int64_t row_stride, int64_t item_stride,
                                int64_t n, int64_t rows, float inv_temp, float* merged,
                                float* lp, float* ent, cudaStream_t stream);

// ---- gemm_sm90: the GEMM with fused epilogues (gemm_sm90.cu) ----

// The kernel serves 16-bit operands a [rows, k] and b [b_rows, k] with k and both row
// strides (elements) multiples of 8 and 16-byte aligned bases, on an sm_90 device with
// sm_90a code in the build.
bool gemm_sm90_supports(DType dtype, int64_t k, const void* a, int64_t lda, const void* b,
                        int64_t ldb);
// Row tiles of `rows` rows: a launch's row tiles times its units per row tile (the head's
// splits) must fit in int32 (the caller checks).
int64_t gemm_sm90_row_tiles(int64_t rows);

// Vocabulary splits of a V-column weight: the fused head's states per row.
int64_t head_partials_splits(int64_t V);

// Split states [rows, splits, 4] fp32 (launch_logprob_chunks' convention: m, s, w, t with
// m and t in logit units) of logits = hidden [rows, H] x weight [V, H]^T, in fp32 from the
// 16-bit operands, never stored. targets as launch_logprob_chunks takes them.
cudaError_t launch_head_partials(const void* hidden, int64_t ld_hidden, const void* weight,
                                 int64_t ld_weight, DType dtype, int64_t rows, int64_t V,
                                 int64_t H, const void* targets, bool targets_int64,
                                 int64_t targets_stride, int64_t vocab_start, float inv_temp,
                                 float* state, cudaStream_t stream);

// ---- kv_cache: store_kv (kv_cache.cu) ----

// k, v rows of row_bytes (k_stride_bytes / v_stride_bytes apart) into k_cache, v_cache
// [slots, row_bytes] at slots [n] int32 or int64 (< 0: skipped). vec16: every pointer,
// row_bytes and both strides allow 16-byte units (else 2-byte units).
cudaError_t launch_store_kv(const void* k, const void* v, void* k_cache, void* v_cache,
                            const void* slots, bool slots_int64, int64_t n, int64_t row_bytes,
                            int64_t k_stride_bytes, int64_t v_stride_bytes, bool vec16,
                            cudaStream_t stream);

// ---- attention: paged prefill attention (attention.cu) ----

struct PagedAttnParams {
  const void* q;             // [N, Hq, D], token stride q_stride, heads contiguous
  const void* k_cache;       // [P, page_size, Hk, D]
  const void* v_cache;       // [P, page_size, Hk, D]
  void* out;                 // [N, Hq, D]
  const int32_t* page_table; // [B, max_pages], row stride pt_stride
  const int32_t* cu_seqlens; // [B + 1]
  const int32_t* kv_lens;    // [B]
  int64_t pt_stride;
  int64_t q_stride;
  int hq, hk, group;         // group = Hq / Hk
  int page_size, page_shift; // page_shift = log2(page_size) or -1
  float scale_log2;          // softmax scale * log2(e)
  int head_dim;
  int64_t cache_slots;       // P * page_size
  int kv_tma_rows;           // wgmma kernel: keys per TMA box of K/V, 0 for none (it sets)
  int kv_tma_pages;          // wgmma kernel: pages a box spans (> 1: only where consecutive)
};

// Three kernels, each with the predicate of the calls it serves; attention_host.cpp picks
// one per call.

// The tiled kernels (wgmma, mma.sync) pack this many query rows (token x head of a KV
// group) into a tile; tiles = ceil(max new tokens * group / rows_per_tile).
int paged_attention_rows_per_tile();

// The wgmma kernel: bf16/fp16 with head dim 64 or 128 on an sm_90 device (the current one),
// when the build holds sm_90a code. Persistent: min(Hk x tiles x B, SMs) blocks claim the
// work items (at most Hk x tiles x B, numbered with an int: the caller keeps that below
// 2^31) from a plan a small kernel writes first into plan_workspace ([B + 2] int32 on the
// device, the caller's, not read before nor after the launch).
// It loads K/V by TMA a whole page at a time where pages are large enough (64 keys or
// more), 64 keys at a time where smaller pages (4-32 keys, dividing 64) are consecutive
// in the cache, else (and for a request's last, partial page or half tile) by cp.async
// gathers; kv_load can rule TMA out or require it (cudaErrorNotSupported where
// the call cannot use it).
enum class KvLoad : int { kAuto, kCpAsync, kTma };
bool paged_attention_wgmma_supports(DType dtype, int head_dim);
cudaError_t launch_paged_attention_wgmma(const PagedAttnParams& p, DType dtype, int batch,
                                         int tiles, KvLoad kv_load, int32_t* plan_workspace,
                                         cudaStream_t stream);

// The mma.sync kernel: bf16/fp16 with head dim 64 or 128, any device. Grid (Hk, tiles, B).
bool paged_attention_mma_supports(DType dtype, int head_dim);
cudaError_t launch_paged_attention_mma(const PagedAttnParams& p, DType dtype, int batch,
                                       int tiles, cudaStream_t stream);

// The simple kernel: any dtype, head dims up to kPagedAttentionSimpleMaxDim; one warp per
// (token, query head); req_of [n_tokens] int32 is each token's request.
constexpr int kPagedAttentionSimpleMaxDim = 256;
bool paged_attention_simple_supports(DType dtype, int head_dim);
cudaError_t launch_paged_attention_simple(const PagedAttnParams& p, DType dtype,
                                          const int32_t* req_of, int64_t n_tokens,
                                          cudaStream_t stream);

// ---- fused: decoder-layer elementwise ops (fused.cu) ----

// A [N, H] or [N, M, H] operand: row r starts at element (r / m) * s0 + (r % m) * s1.
struct RowLayout {
  int64_t m, s0, s1;
};

// x, residual (nullptr: none) [rows, h] by their layouts; weight [h]; out and h_out
// (nullptr when there is no residual) [rows, h] contiguous. vec16: every row start and
// h allow 16-byte units.
cudaError_t launch_rms_norm(const void* x, RowLayout x_rows, const void* residual,
                            RowLayout res_rows, const void* weight, void* out, void* h_out,
                            DType dtype, int64_t rows, int64_t h, float eps, bool vec16,
                            cudaStream_t stream);

// gate_up [rows, 2 * inter] (row stride ld elements) -> out [rows, inter] contiguous.
cudaError_t launch_silu_and_mul(const void* gate_up, int64_t ld, void* out, DType dtype,
                                int64_t rows, int64_t inter, bool vec16, cudaStream_t stream);

// In place on q [n, hq, 2 * half] and k [n, hk, 2 * half] (element strides per token and
// head); positions [n] int32 or int64; cache [max_pos, 2 * half] fp32 (cos | sin).
cudaError_t launch_rotary_embedding(const void* positions, bool positions_int64, void* q,
                                    int64_t q_token_stride, int64_t q_head_stride, int hq,
                                    void* k, int64_t k_token_stride, int64_t k_head_stride,
                                    int hk, const float* cache, int64_t max_pos, int half,
                                    DType dtype, int64_t n, bool vec16, cudaStream_t stream);

}  // namespace cuda
}  // namespace tokenspeed
