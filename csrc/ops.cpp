// Every tokenspeed op schema, declared once. Backends register their kernels at the end
// of their own files with TORCH_LIBRARY_IMPL(tokenspeed, CPU|CUDA, m); fake (meta)
// kernels for torch.compile live beside the Python wrappers in tokenspeed_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(tokenspeed, m) {
  // log_softmax(logits / temperature)[t, targets[t]] and, if asked, the entropy of each
  // row, in one pass over the vocabulary; never writes [T, V].
  // logits [T, V] fp32/bf16/fp16 (any row stride), targets [T] int32/int64
  // -> (logprobs [T] fp32, entropy [T] fp32, or [0] when return_entropy is false)
  m.def("logprobs(Tensor logits, Tensor targets, float temperature=1.0, "
        "bool return_entropy=False) -> (Tensor, Tensor)");
  // The per-row state of one vocabulary shard holding ids [vocab_start, vocab_start + Vs):
  // logits [T, Vs], targets [T] (global ids) -> [T, 4] fp32 rows (m, s, w, t).
  m.def("logprob_partials(Tensor logits, Tensor targets, int vocab_start, "
        "float temperature=1.0) -> Tensor");
  // Merge S shards' partials [S, T, 4] in shard order -> (logprobs [T], entropy [T]).
  m.def("combine_logprob_partials(Tensor partials) -> (Tensor, Tensor)");
  // k, v [N, Hk, D] into k_cache, v_cache [P, page_size, Hk, D] at flat slots
  // slot_mapping [N] (int32/int64; page * page_size + offset; a negative slot is skipped).
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
  // Causal GQA attention of each request's new tokens over its whole paged sequence.
  // q [N, Hq, D]; k_cache, v_cache [P, page_size, Hk, D]; page_table [B, max_pages] int32;
  // cu_seqlens_q [B+1] int32; kv_lens [B] int32 -> out [N, Hq, D] (q's dtype).
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor page_table, Tensor cu_seqlens_q, Tensor kv_lens, float? scale=None) -> Tensor");
}
