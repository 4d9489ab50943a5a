// Every tokenspeed op schema, declared once. Backends register their kernels at the end
// of their own files with TORCH_LIBRARY_IMPL(tokenspeed, CPU|CUDA, m), one file per op
// family and backend: cpu/<family>.cpp and cuda/<family>_host.cpp (kernels in
// cuda/<family>.cuh, launchers in cuda/<family>.cu) for the families logprobs, kv_cache,
// attention, fused and moe. Fake (meta) kernels for torch.compile live beside the Python
// wrappers in tokenspeed_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(tokenspeed, m) {
  // ---- logprobs ----
  // log_softmax(logits / temperature)[t, targets[t]] and, if asked, the entropy of each
  // row, in one pass over the vocabulary; never writes [T, V].
  // logits [T, V] fp32/bf16/fp16 (any row stride), targets [T] int32/int64
  // -> (logprobs [T] fp32, entropy [T] fp32, or [0] when return_entropy is false)
  // validate=False skips the targets' range check (a host round trip) for callers that
  // guarantee it; an out-of-range target then scores -inf (it is never read).
  m.def("logprobs(Tensor logits, Tensor targets, float temperature=1.0, "
        "bool return_entropy=False, bool validate=True) -> (Tensor, Tensor)");
  // The per-row state of one vocabulary shard holding ids [vocab_start, vocab_start + Vs):
  // logits [T, Vs], targets [T] (global ids) -> [T, 4] fp32 rows (m, s, w, t).
  m.def("logprob_partials(Tensor logits, Tensor targets, int vocab_start, "
        "float temperature=1.0, bool validate=True) -> Tensor");
  // logprob_partials of logits = hidden [T, H] x weight [Vs, H]^T (the LM head's product,
  // fp32 from 16-bit operands) without writing them: hidden and weight of one dtype, unit
  // stride along H, weight the rows of ids [vocab_start, vocab_start + Vs) -> [T, 4].
  // batch_invariant: a row's partials do not depend on the other rows of the call.
  m.def("head_logprob_partials(Tensor hidden, Tensor weight, Tensor targets, int vocab_start, "
        "float temperature=1.0, bool validate=True, bool batch_invariant=False) -> Tensor");
  // Merge S shards' partials [S, T, 4] in shard order -> (logprobs [T], entropy [T]).
  m.def("combine_logprob_partials(Tensor partials) -> (Tensor, Tensor)");
  // logprob_partials plus the shard's k (1..64) largest x = logits * (1 / temperature),
  // in descending order with ties to the lower id: -> (partials [T, 4], values [T, k]
  // fp32, ids [T, k] int64 global ids; id -1 and value -inf past the shard's columns).
  m.def("logprob_topk_partials(Tensor logits, Tensor targets, int vocab_start, "
        "float temperature, int k, bool validate=True) -> (Tensor, Tensor, Tensor)");
  // The mass of the tokens at or above each threshold, for the sampler filters' second
  // pass: logits [T, V], thresholds [T, n] and ref_m [T] fp32 (x units) -> [T, n, 2] fp32
  // sums over x >= thresholds[t, i] of e^(x - ref_m[t]) and e^(x - ref_m[t]) (x - ref_m[t]).
  m.def("logprob_mass_above(Tensor logits, float temperature, Tensor thresholds, "
        "Tensor ref_m) -> Tensor");
  // The sampler filters' kept set {x >= tau} of each row from its candidates: values
  // [T, k] fp32 (descending, ties to the lower id), ids [T, k] int64 (-1 past the row),
  // ref_m, big_s, big_w [T] fp32 (the merged state, S and W relative to ref_m), top_k
  // [T] int64 (0 = off), top_p, min_p [T] fp32, pass_mass [T, 2] fp32 or None (the sums
  // of {x >= tau} at the tau an earlier call gave a pending row; NaN rows: none)
  // -> (tau, S', W' [T] fp32, pending [T] bool: the row needs a pass over its logits at
  // its tau, or the top-p search where tau is NaN; its other outputs are not final).
  m.def("filter_kept_set(Tensor values, Tensor ids, Tensor ref_m, Tensor big_s, "
        "Tensor big_w, Tensor top_k, Tensor top_p, Tensor min_p, Tensor? pass_mass=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // ---- kv_cache ----
  // k, v [N, Hk, D] into k_cache, v_cache [P, page_size, Hk, D] at flat slots
  // slot_mapping [N] (int32/int64; page * page_size + offset; a negative slot is skipped).
  // validate=False skips the slot-range check (a device-to-host round trip): only for a
  // slot_mapping already checked, e.g. by the first layer of the same forward.
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, bool validate=True) -> ()");
  // ---- attention ----
  // Causal GQA attention of each request's new tokens over its whole paged sequence.
  // q [N, Hq, D]; k_cache, v_cache [P, page_size, Hk, D]; page_table [B, max_pages] int32;
  // cu_seqlens_q [B+1] int32; kv_lens [B] int32 -> out [N, Hq, D] (q's dtype).
  // max_seqlen_q (the most new tokens of any request) sizes the CUDA grid without reading
  // cu_seqlens_q back to the host; validate=False skips the data-dependent metadata checks
  // (host round trips): both are for metadata already checked, e.g. by the first layer.
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor page_table, Tensor cu_seqlens_q, Tensor kv_lens, float? scale=None, "
        "int? max_seqlen_q=None, bool validate=True) -> Tensor");
  // ---- fused: elementwise ops of the decoder layers (HF's rounding points kept) ----
  // RMSNorm with an optional fused residual add. x [N, H] or [N, M, H] fp32/bf16/fp16
  // (unit stride along H, any other strides), weight [H] in x's dtype, residual like x.
  // h = x + residual rounded to x's dtype (or x); out = weight * (h * rsqrt(mean(h^2) +
  // eps) in fp32, rounded to the dtype), rounded again. -> (out, h) both contiguous in
  // x's shape; without residual the second output is an empty [0] tensor.
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual=None) "
        "-> (Tensor, Tensor)");
  // gate_up [N, 2I] (unit column stride) -> silu(gate) * up [N, I], silu rounded to the
  // dtype before the product, as torch's two ops do.
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  // Neox-style rotary embedding in place on q [N, Hq, D] and k [N, Hk, D] (unit stride
  // along D, any token/head strides) at positions [N] int32/int64.
  // cos_sin_cache [max_pos, D] fp32: cos in columns [0, D/2), sin in [D/2, D); both are
  // rounded to q's dtype before use. validate=False skips the position-range check (a
  // device-to-host round trip): only for positions already checked, e.g. by the engine.
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, "
        "Tensor cos_sin_cache, bool validate=True) -> ()");
  // ---- moe: the routing, dispatch and combine steps of a mixture-of-experts layer ----
  // Router: softmax over the E experts in fp32, the top_k largest (largest first, ties
  // toward the lower expert id), weights divided by their sum when renormalize.
  // logits [T, E] fp32/bf16/fp16 (unit stride along E); forced [T, top_k] int32 (optional):
  // a row whose first id is >= 0 uses those experts, in that order, instead of the top k
  // (routing replay), weighted by their probabilities. -> (weights [T, k] fp32, ids [T, k]
  // int32). validate=False skips the forced ids' range check (a host round trip).
  m.def("moe_route(Tensor logits, int top_k, bool renormalize, Tensor? forced=None, "
        "bool validate=True) -> (Tensor, Tensor)");
  // Groups the T * k (token, slot) pairs of ids [T, k] int32 by expert, stable in pair
  // order t * k + s. -> (offsets [E + 1] int32, sorted_tokens [T * k] int32: the token of
  // each grouped row, pair_rows [T * k] int32: the grouped row of each pair).
  // validate=False skips the ids' range check (a host round trip).
  m.def("moe_dispatch(Tensor ids, int num_experts, bool validate=True) "
        "-> (Tensor, Tensor, Tensor)");
  // out[t] = sum over s = 0..k-1, in that order, of weights[t, s] * expert_out[pair_rows[
  // t * k + s]], accumulated in fp32 and rounded once to expert_out's dtype.
  // expert_out [T * k, H] (unit stride along H), pair_rows [T * k] int32, weights [T, k] fp32.
  m.def("moe_combine(Tensor expert_out, Tensor pair_rows, Tensor weights) -> Tensor");
  // The experts' matrix products, batch-invariant by construction: rows offsets[e]:
  // offsets[e + 1] of x [M, K] times weight[e]^T, weight [E, N, K] in x's dtype (fp32/bf16/
  // fp16) -> [M, N] in x's dtype. offsets [E + 1] int32/int64: offsets[0] = 0,
  // non-decreasing, offsets[E] = M. Each output element is one dot product over K
  // accumulated in fp32 in an order fixed by K alone (no split-K): it never depends on M,
  // on the row's place, on the experts' row counts or on other rows' values.
  // validate=False skips the offsets' value checks (a host round trip on CUDA); bad
  // offsets then give wrong rows but no access outside x and the output.
  m.def("grouped_gemm(Tensor x, Tensor weight, Tensor offsets, bool validate=True) -> Tensor");
}
