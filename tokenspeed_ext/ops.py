"""Typed wrappers over torch.ops.tokenspeed.*, each with the fake kernel torch.compile uses.

Argument checks live inside the C++ ops (shared by CPU and CUDA), not here, so
``torch.compile(fullgraph=True)`` traces these wrappers without a graph break.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._build import load_library

BUILD = load_library()
_ops = torch.ops.tokenspeed


def logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0,
             return_entropy: bool = False, validate: bool = True
             ) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax(logits / temperature)[t, targets[t]]`` for every row, in fp32.

    logits [T, V] fp32/bf16/fp16 (rows may be strided, e.g. ``x[:, :V]``), targets [T]
    int32/int64. Returns logprobs [T] fp32, or (logprobs, entropy) with
    ``return_entropy=True``. Never materialises [T, V]. ``validate=False`` skips the
    targets' range check (a device-to-host round trip) for callers that guarantee
    ``0 <= targets < V``; an out-of-range target then scores -inf.
    """
    lp, ent = _ops.logprobs.default(logits, targets, float(temperature), bool(return_entropy),
                                    bool(validate))
    return (lp, ent) if return_entropy else lp


def logprob_partials(logits: Tensor, targets: Tensor, vocab_start: int,
                     temperature: float = 1.0, validate: bool = True) -> Tensor:
    """Per-row state [T, 4] fp32 of one vocabulary shard (ids vocab_start .. +Vs).

    Columns: m = max x, s = sum exp(x - m), w = sum exp(x - m) * (x - m), t = x[target]
    (-inf when the target is outside the shard), with x = logits / temperature.
    ``validate=False`` skips the check that targets are >= 0 (a host round trip).
    """
    return _ops.logprob_partials.default(logits, targets, int(vocab_start), float(temperature),
                                         bool(validate))


def head_logprob_partials(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_start: int = 0,
                          temperature: float = 1.0, validate: bool = True,
                          batch_invariant: bool = False) -> Tensor:
    """``logprob_partials(hidden @ weight.T, ...)`` without writing the logits.

    hidden [T, H] and weight [Vs, H] (the LM head's rows of ids vocab_start .. +Vs) of one
    dtype, contiguous along H; the product is taken in fp32 (exact products of 16-bit
    operands). On an H100/H200 (sm_90) with bf16/fp16 operands the partials come from the
    GEMM's epilogue; elsewhere from the fp32 product in bounded row blocks. Returns [T, 4]
    fp32, as ``logprob_partials``; ``combine_logprob_partials(p[None])`` finishes them.
    ``batch_invariant``: each row's partials are bitwise the same whatever other rows share
    the call (the fused kernel always is; the fallback then pads its last row block to a
    whole one, as its GEMM's algorithm follows the shape).
    """
    return _ops.head_logprob_partials.default(hidden, weight, targets, int(vocab_start),
                                              float(temperature), bool(validate),
                                              bool(batch_invariant))


def combine_logprob_partials(partials: Tensor) -> tuple[Tensor, Tensor]:
    """Merge shard partials [S, T, 4] in shard order -> (logprobs [T], entropy [T])."""
    return _ops.combine_logprob_partials.default(partials)


def logprob_topk_partials(logits: Tensor, targets: Tensor, vocab_start: int,
                          temperature: float, k: int, validate: bool = True
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """``logprob_partials`` and the shard's k (1..64) largest x, in one read of the rows.

    Returns (partials [T, 4], values [T, k] fp32, ids [T, k] int64): x = logits * (1 /
    temperature) in fp32, descending, ties to the lower id, ids global (vocab_start
    added); past the shard's columns the places hold id -1 and -inf.
    """
    return _ops.logprob_topk_partials.default(logits, targets, int(vocab_start),
                                              float(temperature), int(k), bool(validate))


def logprob_mass_above(logits: Tensor, temperature: float, thresholds: Tensor,
                       ref_m: Tensor) -> Tensor:
    """[T, n, 2] fp32: over x >= thresholds[t, i] (x = logits * (1 / temperature) in
    fp32), the sums of e^(x - ref_m[t]) and e^(x - ref_m[t]) (x - ref_m[t]).

    thresholds [T, n] and ref_m [T] fp32, in x units. The second pass of the sampler
    filters: shards' sums (same ref_m) add up.
    """
    return _ops.logprob_mass_above.default(logits, float(temperature), thresholds, ref_m)


def filter_kept_set(values: Tensor, ids: Tensor, ref_m: Tensor, big_s: Tensor, big_w: Tensor,
                    top_k: Tensor, top_p: Tensor, min_p: Tensor,
                    pass_mass: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sampler filters' kept set {x >= tau} of each row from its candidates.

    values [T, k] fp32 (descending, ties to the lower id) and ids [T, k] int64 (-1 past
    the row), as ``logprob_topk_partials`` gives them; ref_m, big_s, big_w [T] fp32: the
    merged row state (S and W relative to ref_m); top_k [T] int64 (0 = off), top_p and
    min_p [T] fp32. Returns (tau, S', W') [T] fp32 and pending [T] bool: the rows whose
    kept set the candidates do not settle, their other outputs not final. A pending row
    asks for a pass over its logits at its tau (the sums of {x >= tau}, as
    ``logprob_mass_above`` gives them), or for the top-p search where tau is NaN. Called
    again with those sums in ``pass_mass`` [T, 2] fp32 (NaN rows: none given), a row that
    asked for a pass is settled. tokenspeed.layers.sampler_filters gives the steps.
    """
    return _ops.filter_kept_set.default(values, ids, ref_m, big_s, big_w, top_k, top_p, min_p,
                                        pass_mass)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor, validate: bool = True) -> None:
    """Write k, v [N, Hk, D] into the paged caches [P, page_size, Hk, D] in place.

    slot_mapping [N] holds flat slots ``page * page_size + offset``; negative slots are
    skipped. ``validate=False`` skips the slot-range check (a device-to-host round trip):
    pass it only for a slot_mapping already checked, e.g. by an earlier layer.
    """
    _ops.store_kv.default(k, v, k_cache, v_cache, slot_mapping, bool(validate))


def paged_prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor,
                            cu_seqlens_q: Tensor, kv_lens: Tensor,
                            scale: float | None = None, max_seqlen_q: int | None = None,
                            validate: bool = True) -> Tensor:
    """Causal GQA attention of each request's new tokens over its paged sequence.

    q [N, Hq, D]; caches [P, page_size, Hk, D]; page_table [B, max_pages] int32;
    cu_seqlens_q [B+1] int32; kv_lens [B] int32. Request b's new tokens (rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q) are the last of its kv_lens[b] positions.
    Returns [N, Hq, D] in q's dtype; softmax state in fp32; scale defaults to D**-0.5.

    Like flash-attention's varlen API, ``max_seqlen_q`` (the most new tokens of any
    request) lets the CUDA kernel size its grid without reading cu_seqlens_q back to the
    host, and ``validate=False`` skips the data-dependent metadata checks; use both for
    metadata already checked once per forward (the engine checks it in layer 0).
    """
    return _ops.paged_prefill_attention.default(
        q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens,
        None if scale is None else float(scale),
        None if max_seqlen_q is None else int(max_seqlen_q), bool(validate))


def rms_norm(x: Tensor, weight: Tensor, eps: float,
             residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """HF's RMSNorm of x [N, H] or [N, M, H] (unit stride along H) with weight [H].

    Rounds where HF does: ``weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)`` with the
    normalisation in fp32. With ``residual`` (x's shape and dtype), h = x + residual in the
    dtype and the call returns (out, h), h being the next layer's residual; else out.
    """
    out, h = _ops.rms_norm.default(x, weight, float(eps), residual)
    return out if residual is None else (out, h)


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of gate_up [N, 2I] = [gate | up] -> [N, I], rounded as torch's
    two ops round (silu to the dtype, then the product)."""
    return _ops.silu_and_mul.default(gate_up)


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor,
                     validate: bool = True) -> None:
    """Neox (rotate_half) rotary embedding of q [N, Hq, D] and k [N, Hk, D], in place.

    q and k may be strided views (unit stride along D); positions [N] int32/int64 index
    cos_sin_cache [max_pos, D] fp32 (cos in the first D/2 columns, sin in the rest), whose
    values are rounded to q's dtype before use as HF does. ``validate=False`` skips the
    position-range check (a device-to-host round trip) for positions already checked.
    """
    _ops.rotary_embedding.default(positions, q, k, cos_sin_cache, bool(validate))


# Fake kernels: shapes and dtypes only, for torch.compile / FakeTensor tracing. They also
# serve a real call that mixes meta tensors with others (the dispatcher picks the meta
# kernel), so each checks, as the C++ ops do, that its tensors share one device.

def _same_device(op: str, **tensors: Tensor | None) -> None:
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        torch._check(t.device == first.device,
                     lambda: f"tokenspeed.{op}: {name} is on {t.device} but {first_name} "
                             f"is on {first.device}")


@torch.library.register_fake("tokenspeed::logprobs")
def _logprobs_fake(logits, targets, temperature=1.0, return_entropy=False, validate=True):
    _same_device("logprobs", logits=logits, targets=targets)
    torch._check(logits.dim() == 2, lambda: f"logits must be [T, V], got {logits.shape}")
    t = logits.shape[0]
    lp = logits.new_empty((t,), dtype=torch.float32)
    ent = logits.new_empty((t if return_entropy else 0,), dtype=torch.float32)
    return lp, ent


@torch.library.register_fake("tokenspeed::logprob_partials")
def _logprob_partials_fake(logits, targets, vocab_start, temperature=1.0, validate=True):
    _same_device("logprob_partials", logits=logits, targets=targets)
    torch._check(logits.dim() == 2, lambda: f"logits must be [T, Vs], got {logits.shape}")
    return logits.new_empty((logits.shape[0], 4), dtype=torch.float32)


@torch.library.register_fake("tokenspeed::head_logprob_partials")
def _head_logprob_partials_fake(hidden, weight, targets, vocab_start, temperature=1.0,
                                validate=True, batch_invariant=False):
    _same_device("head_logprob_partials", hidden=hidden, weight=weight, targets=targets)
    return hidden.new_empty((hidden.shape[0], 4), dtype=torch.float32)


@torch.library.register_fake("tokenspeed::combine_logprob_partials")
def _combine_fake(partials):
    torch._check(partials.dim() == 3, lambda: f"partials must be [S, T, 4], got {partials.shape}")
    t = partials.shape[1]
    return partials.new_empty((t,)), partials.new_empty((t,))


@torch.library.register_fake("tokenspeed::logprob_topk_partials")
def _logprob_topk_partials_fake(logits, targets, vocab_start, temperature, k, validate=True):
    _same_device("logprob_topk_partials", logits=logits, targets=targets)
    torch._check(logits.dim() == 2, lambda: f"logits must be [T, Vs], got {logits.shape}")
    torch._check(1 <= k <= 64, lambda: f"k must be in [1, 64], got {k}")
    t = logits.shape[0]
    return (logits.new_empty((t, 4), dtype=torch.float32),
            logits.new_empty((t, k), dtype=torch.float32),
            logits.new_empty((t, k), dtype=torch.int64))


@torch.library.register_fake("tokenspeed::logprob_mass_above")
def _logprob_mass_above_fake(logits, temperature, thresholds, ref_m):
    _same_device("logprob_mass_above", logits=logits, thresholds=thresholds, ref_m=ref_m)
    torch._check(thresholds.dim() == 2, lambda: f"thresholds must be [T, n], got "
                                                f"{thresholds.shape}")
    return logits.new_empty((logits.shape[0], thresholds.shape[1], 2), dtype=torch.float32)


@torch.library.register_fake("tokenspeed::filter_kept_set")
def _filter_kept_set_fake(values, ids, ref_m, big_s, big_w, top_k, top_p, min_p,
                          pass_mass=None):
    _same_device("filter_kept_set", values=values, ids=ids, ref_m=ref_m, big_s=big_s,
                 big_w=big_w, top_k=top_k, top_p=top_p, min_p=min_p, pass_mass=pass_mass)
    torch._check(values.dim() == 2 and 1 <= values.shape[1] <= 64,
                 lambda: f"values must be [T, k] with k in [1, 64], got {values.shape}")
    t = values.shape[0]
    return (values.new_empty((t,)), values.new_empty((t,)), values.new_empty((t,)),
            values.new_empty((t,), dtype=torch.bool))


@torch.library.register_fake("tokenspeed::store_kv")
def _store_kv_fake(k, v, k_cache, v_cache, slot_mapping, validate=True):
    _same_device("store_kv", k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                 slot_mapping=slot_mapping)
    return None


@torch.library.register_fake("tokenspeed::paged_prefill_attention")
def _paged_prefill_attention_fake(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens,
                                  scale=None, max_seqlen_q=None, validate=True):
    _same_device("paged_prefill_attention", q=q, k_cache=k_cache, v_cache=v_cache,
                 page_table=page_table, cu_seqlens_q=cu_seqlens_q, kv_lens=kv_lens)
    return torch.empty_like(q)


@torch.library.register_fake("tokenspeed::rms_norm")
def _rms_norm_fake(x, weight, eps, residual=None):
    _same_device("rms_norm", x=x, weight=weight, residual=residual)
    out = x.new_empty(x.shape)
    return out, (x.new_empty(x.shape) if residual is not None else x.new_empty((0,)))


@torch.library.register_fake("tokenspeed::silu_and_mul")
def _silu_and_mul_fake(gate_up):
    torch._check(gate_up.dim() == 2, lambda: f"gate_up must be [N, 2I], got {gate_up.shape}")
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.register_fake("tokenspeed::rotary_embedding")
def _rotary_embedding_fake(positions, q, k, cos_sin_cache, validate=True):
    _same_device("rotary_embedding", q=q, k=k, positions=positions,
                 cos_sin_cache=cos_sin_cache)
    return None


# ---- moe ----

def moe_route(logits: Tensor, top_k: int, renormalize: bool, forced: Tensor | None = None,
              validate: bool = True) -> tuple[Tensor, Tensor]:
    """Router of an MoE layer: (weights [T, k] fp32, ids [T, k] int32) from logits [T, E].

    softmax in fp32 over all E experts, the top_k largest (largest first; ties go to the
    lower expert id), weights divided by their sum when ``renormalize``. A row of
    ``forced`` [T, k] int32 whose first id is >= 0 uses those experts in that order
    (routing replay) with their probabilities as weights; rows of -1 route freely.
    ``validate=False`` skips the forced ids' range check (a host round trip).
    """
    return _ops.moe_route.default(logits, int(top_k), bool(renormalize), forced,
                                  bool(validate))


def moe_dispatch(ids: Tensor, num_experts: int, validate: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Group the (token, slot) pairs of ids [T, k] int32 by expert, stable in pair order:
    (offsets [E + 1], sorted_tokens [T * k], pair_rows [T * k]), all int32; expert e's
    rows are offsets[e]:offsets[e + 1] of the grouped order."""
    return _ops.moe_dispatch.default(ids, int(num_experts), bool(validate))


def moe_combine(expert_out: Tensor, pair_rows: Tensor, weights: Tensor) -> Tensor:
    """out [T, H] = sum over s (in order) of weights[t, s] * expert_out[pair_rows[t*k+s]],
    in fp32, rounded once to expert_out's dtype."""
    return _ops.moe_combine.default(expert_out, pair_rows, weights)


def grouped_gemm(x: Tensor, weight: Tensor, offsets: Tensor, validate: bool = True) -> Tensor:
    """Rows offsets[e]:offsets[e + 1] of x [M, K] times weight[e]^T (weight [E, N, K], x's
    dtype) -> [M, N] in x's dtype; offsets [E + 1] int32/int64 from 0 to M, non-decreasing.

    Batch-invariant by construction: each output element is one dot product over K in fp32
    in an order fixed by K alone, so a row's result never depends on M, its place, the
    experts' row counts or the other rows (deterministic mode's expert GEMMs; slower than
    ``torch._grouped_mm``). ``validate=False`` skips the offsets' value checks (a host
    round trip on CUDA) for offsets that come from ``moe_dispatch``.
    """
    return _ops.grouped_gemm.default(x, weight, offsets, bool(validate))


@torch.library.register_fake("tokenspeed::moe_route")
def _moe_route_fake(logits, top_k, renormalize, forced=None, validate=True):
    _same_device("moe_route", logits=logits, forced=forced)
    torch._check(logits.dim() == 2, lambda: f"logits must be [T, E], got {logits.shape}")
    shape = (logits.shape[0], top_k)
    return (logits.new_empty(shape, dtype=torch.float32),
            logits.new_empty(shape, dtype=torch.int32))


@torch.library.register_fake("tokenspeed::moe_dispatch")
def _moe_dispatch_fake(ids, num_experts, validate=True):
    torch._check(ids.dim() == 2, lambda: f"ids must be [T, k], got {ids.shape}")
    pairs = ids.shape[0] * ids.shape[1]
    return (ids.new_empty((num_experts + 1,), dtype=torch.int32),
            ids.new_empty((pairs,), dtype=torch.int32), ids.new_empty((pairs,), dtype=torch.int32))


@torch.library.register_fake("tokenspeed::moe_combine")
def _moe_combine_fake(expert_out, pair_rows, weights):
    _same_device("moe_combine", expert_out=expert_out, pair_rows=pair_rows, weights=weights)
    torch._check(weights.dim() == 2, lambda: f"weights must be [T, k], got {weights.shape}")
    return expert_out.new_empty((weights.shape[0], expert_out.shape[1]))


@torch.library.register_fake("tokenspeed::grouped_gemm")
def _grouped_gemm_fake(x, weight, offsets, validate=True):
    _same_device("grouped_gemm", x=x, weight=weight, offsets=offsets)
    torch._check(x.dim() == 2, lambda: f"x must be [M, K], got {x.shape}")
    torch._check(weight.dim() == 3, lambda: f"weight must be [E, N, K], got {weight.shape}")
    return x.new_empty((x.shape[0], weight.shape[1]))
