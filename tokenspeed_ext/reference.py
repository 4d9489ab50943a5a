"""Pure-PyTorch reference of every op: the executable spec the kernels are tested against.

Each function computes and returns in ``dtype`` (float64 by default), so a kernel's fp32
error can be measured against it. Attention returns [N, Hq, D] in ``dtype`` too.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0,
             return_entropy: bool = False, dtype: torch.dtype = torch.float64
             ) -> Tensor | tuple[Tensor, Tensor]:
    x = logits.to(dtype) / temperature
    logp = torch.log_softmax(x, dim=-1)
    lp = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return lp
    p = logp.exp()
    # -inf logits have p = 0 and contribute nothing (0 * -inf would be nan)
    ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    no_finite = torch.isneginf(x).all(dim=-1)  # log_softmax gives nan there; so does entropy
    ent = torch.where(no_finite, torch.full_like(ent, math.nan), ent)
    return lp, ent


def logprob_partials(logits: Tensor, targets: Tensor, vocab_start: int,
                     temperature: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """[T, 4] rows (m, s, w, t) of one shard; see tokenspeed_ext.ops.logprob_partials."""
    x = logits.to(dtype) / temperature
    t_rows, vs = x.shape
    m = x.max(dim=-1).values if vs else x.new_full((t_rows,), -math.inf)
    finite_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shifted = x - finite_m.unsqueeze(-1)
    e = torch.where(torch.isneginf(x), torch.zeros_like(x), shifted.exp())
    s = e.sum(-1)
    w = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(-1)
    local = targets.long() - vocab_start
    inside = (local >= 0) & (local < vs)
    t = x.gather(-1, local.clamp(0, max(vs - 1, 0)).unsqueeze(-1)).squeeze(-1)
    t = torch.where(inside, t, torch.full_like(t, -math.inf))
    return torch.stack([m, s, w, t], dim=-1)


def combine_logprob_partials(partials: Tensor, dtype: torch.dtype = torch.float64
                             ) -> tuple[Tensor, Tensor]:
    """Merge [S, T, 4] shard states; rows with no finite logit give nan."""
    p = partials.to(dtype)
    m, s, w, t = p.unbind(-1)
    big_m = m.max(dim=0).values
    safe_m = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    scale = torch.where(torch.isneginf(m), torch.zeros_like(m), (m - safe_m).exp())
    big_s = (s * scale).sum(0)
    # w_i is relative to m_i: move it to M before summing
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m - safe_m)
    big_w = ((w + s * shift) * scale).sum(0)
    big_t = t.max(dim=0).values
    log_s = big_s.log()
    lp = big_t - big_m - log_s
    ent = log_s - big_w / big_s
    nan = torch.full_like(lp, math.nan)
    lp = torch.where(torch.isneginf(big_m), nan, lp)
    ent = torch.where(torch.isneginf(big_m), nan, ent)
    return lp, ent


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    """In place, like the op: rows with a negative slot are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    hk, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, hk, d)[slots] = k[keep]
    v_cache.view(-1, hk, d)[slots] = v[keep]


def depage(cache: Tensor, pages: Tensor, length: int) -> Tensor:
    """Rebuild one request's contiguous [length, Hk, D] from its page list."""
    page_size = cache.shape[1]
    n_pages = (length + page_size - 1) // page_size
    return cache[pages[:n_pages].long()].reshape(-1, *cache.shape[2:])[:length]


def paged_prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor,
                            cu_seqlens_q: Tensor, kv_lens: Tensor, scale: float | None = None,
                            dtype: torch.dtype = torch.float64) -> Tensor:
    n, hq, d = q.shape
    hk = k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(n, hq, d, dtype=dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b, kv_len in enumerate(kv_lens.tolist()):
        q_b = q[cu[b]:cu[b + 1]].to(dtype)  # [n_new, Hq, D]
        n_new = q_b.shape[0]
        if n_new == 0:
            continue
        k_b = depage(k_cache, page_table[b], kv_len).to(dtype)
        v_b = depage(v_cache, page_table[b], kv_len).to(dtype)
        k_b = k_b.repeat_interleave(hq // hk, dim=1)  # [kv_len, Hq, D]
        v_b = v_b.repeat_interleave(hq // hk, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_b, k_b) * scale
        q_pos = torch.arange(kv_len - n_new, kv_len, device=q.device)
        k_pos = torch.arange(kv_len, device=q.device)
        mask = k_pos.unsqueeze(0) > q_pos.unsqueeze(1)  # [n_new, kv_len]
        scores = scores.masked_fill(mask, -math.inf)
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_b)
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
             dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor | None]:
    """(weight * h / sqrt(mean(h^2) + eps), h) in ``dtype``. The residual add h = x +
    residual is rounded to x's dtype as the model does it (a spec input, not an error);
    h is None without a residual."""
    h = x if residual is None else x + residual
    hd = h.to(dtype)
    out = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)
    return out, (None if residual is None else h)


def silu_and_mul(gate_up: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    gate, up = gate_up.to(dtype).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_cos_sin_cache(inv_freq: Tensor, max_positions: int, attention_factor: float = 1.0
                       ) -> Tensor:
    """[max_positions, D] fp32 table (cos | sin) of the angles position * inv_freq [D/2],
    computed as the engine's rotary layer computes them."""
    freqs = torch.arange(max_positions, device=inv_freq.device).float().unsqueeze(-1) \
        * inv_freq.unsqueeze(0)
    return torch.cat((freqs.cos() * attention_factor, freqs.sin() * attention_factor), dim=-1)


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor,
                     dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Rotated (q, k) in ``dtype`` (not in place), cos/sin taken from the fp32 table."""
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache[positions.long()].to(dtype)
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rotate(x: Tensor) -> Tensor:
        x1, x2 = x.to(dtype).chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rotate(q), rotate(k)


def _per_row(value, rows: int, dtype: torch.dtype) -> Tensor:
    """A scalar or [T] setting as a [T] CPU tensor."""
    t = torch.as_tensor(value, dtype=dtype).cpu()
    return t.expand(rows) if t.dim() == 0 else t


def sampler_keep(x: Tensor, top_k: int, top_p: float, min_p: float) -> Tensor:
    """Bool mask of the tokens a sampler keeps in one row x = logits / temperature [V].

    In order, each over what the previous step kept, renormalised: top-k keeps x >= the
    k-th largest x (ties at the boundary kept, as vLLM's ``x < kth`` mask keeps them;
    0 = off); top-p keeps a token when the mass of the kept tokens with a strictly larger
    x is < p (vLLM's rule, with a whole tie group kept or dropped together; 1 = off);
    min-p keeps p >= min_p * p_max (0 = off).
    """
    keep = torch.ones_like(x, dtype=torch.bool)
    v = x.shape[0]
    if top_k > 0 and top_k < v:
        kth = x.sort(descending=True).values[top_k - 1]
        keep &= x >= kth
    if top_p < 1.0:
        probs = torch.softmax(torch.where(keep, x, -math.inf), -1)
        asc = torch.where(keep, x, -math.inf).sort().values
        cum = torch.cat([probs.sort().values.cumsum(0), probs.new_zeros(1)])
        # mass strictly above x_i: total minus the mass of everything <= x_i
        at_or_below = torch.searchsorted(asc, x, right=True)
        above = cum[-2] - cum.roll(1)[at_or_below]
        keep &= above < top_p
    if min_p > 0.0:
        probs = torch.softmax(torch.where(keep, x, -math.inf), -1)
        keep &= probs >= min_p * probs.max()
    return keep


def sampler_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0,
                     top_k=0, top_p=1.0, min_p=0.0, top_logprobs: int = 0,
                     token_ids: list[list[int]] | None = None,
                     dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """The rich scoring outputs of rows of logits [T, V] under the sampler's processed
    distribution (sampler_keep, renormalised); top_k, top_p, min_p are scalars or [T].

    Returns log_probs [T] and entropy [T] (over the kept set; a filtered target scores
    -inf), top_ids / top_logprobs [T, top_logprobs] (the largest x, ties to the lower id,
    their log-probs under the same distribution; id -1 and -inf past the vocabulary) and,
    with token_ids (one id list per row), token_logprobs: one [len] tensor per row.
    """
    x = logits.to(dtype).cpu() / temperature
    rows, v = x.shape
    ks = _per_row(top_k, rows, torch.int64)
    ps = _per_row(top_p, rows, torch.float64)
    mins = _per_row(min_p, rows, torch.float64)
    lp = x.new_empty(rows)
    ent = x.new_empty(rows)
    top_ids = torch.full((rows, top_logprobs), -1, dtype=torch.int64)
    top_lp = x.new_full((rows, top_logprobs), -math.inf)
    tok = []
    for r in range(rows):
        keep = sampler_keep(x[r], int(ks[r]), float(ps[r]), float(mins[r]))
        logp = torch.log_softmax(torch.where(keep, x[r], -math.inf), -1)
        lp[r] = logp[int(targets[r])]
        p = logp.exp()
        ent[r] = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum()
        if bool(logp.isnan().any()):  # no finite logit: nan, as the log-probs
            ent[r] = math.nan
        n = min(top_logprobs, v)
        # a stable sort of the ids in order keeps equal values in ascending id order
        order = torch.sort(x[r], descending=True, stable=True).indices[:n]
        top_ids[r, :n] = order
        top_lp[r, :n] = logp[order]
        if token_ids is not None:
            tok.append(logp[torch.as_tensor(token_ids[r], dtype=torch.int64)])
    out = {"log_probs": lp, "entropy": ent, "top_ids": top_ids, "top_logprobs": top_lp}
    if token_ids is not None:
        out["token_logprobs"] = tok
    return out


def _topk_order(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of rows x [T, V] (ties to the lower column), padded with -inf, -1."""
    rows, v = x.shape
    n = min(k, v)
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :n]
    vals = torch.full((rows, k), -math.inf, dtype=x.dtype)
    ids = torch.full((rows, k), -1, dtype=torch.int64)
    vals[:, :n] = x.gather(-1, order)
    ids[:, :n] = order
    return vals, ids


def logprob_topk_partials(logits: Tensor, targets: Tensor, vocab_start: int,
                          temperature: float, k: int, dtype: torch.dtype = torch.float64
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(partials [T, 4], values [T, k] of x, global ids [T, k]) of one shard; see
    tokenspeed_ext.ops.logprob_topk_partials. The candidates are ordered from the fp32
    x = logits * (1 / temperature) the kernels compare, so ties match theirs."""
    x32 = logits.float().cpu() * (1.0 / temperature)
    _, ids = _topk_order(x32, k)
    vals = torch.where(ids >= 0, (logits.to(dtype).cpu() / temperature).gather(
        -1, ids.clamp_min(0)), torch.full(ids.shape, -math.inf, dtype=dtype))
    parts = logprob_partials(logits, targets, vocab_start, temperature, dtype)
    return parts, vals, torch.where(ids >= 0, ids + vocab_start, ids)


def logprob_mass_above(logits: Tensor, temperature: float, thresholds: Tensor, ref_m: Tensor,
                       dtype: torch.dtype = torch.float64) -> Tensor:
    """[T, n, 2]: sum of e^(x - ref_m) and e^(x - ref_m) (x - ref_m) over x >= each of a
    row's n thresholds, x = fp32 logits * (1 / temperature) as the kernels compare it."""
    x32 = logits.float().cpu() * (1.0 / temperature)
    x = logits.to(dtype).cpu() / temperature
    d = x - ref_m.to(dtype).cpu().unsqueeze(-1)
    e = torch.where(torch.isneginf(x32), torch.zeros_like(d), d.exp())
    w = torch.where(e > 0, e * d, torch.zeros_like(d))
    inside = x32.unsqueeze(1) >= thresholds.float().cpu().unsqueeze(-1)  # [T, n, V]
    return torch.stack([(inside * e.unsqueeze(1)).sum(-1), (inside * w.unsqueeze(1)).sum(-1)],
                       dim=-1)
# ---- moe: routing, dispatch and combine of mixture-of-experts layers ----

def moe_route(logits: Tensor, top_k: int, renormalize: bool, forced: Tensor | None = None,
              dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(weights [T, k] in ``dtype``, ids [T, k] int32) of softmax(logits) over E experts.

    Free rows pick the k largest probabilities, largest first, ties toward the lower
    expert id (a stable sort on the negated probabilities). A row of ``forced`` [T, k]
    whose first id is >= 0 takes those ids in that order instead; either way the weights
    are the chosen probabilities, divided by their sum when ``renormalize``.
    """
    probs = torch.softmax(logits.to(dtype), dim=-1)
    order = torch.sort(-probs, dim=-1, stable=True).indices[:, :top_k]
    ids = order
    if forced is not None:
        free = forced[:, 0] < 0
        ids = torch.where(free[:, None], order, forced.long())
    weights = probs.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_dispatch(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the T * k (token, slot) pairs of ids [T, k] by expert, stable in pair order.

    Returns offsets [E + 1] int32 (expert e's pairs are rows offsets[e]:offsets[e+1] of the
    grouped order), sorted_tokens [T * k] int32 (the token of each grouped row) and
    pair_rows [T * k] int32 (the grouped row of pair t * k + s).
    """
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = counts.cumsum(0)
    pair_rows = torch.empty_like(order)
    pair_rows[order] = torch.arange(len(order), device=ids.device)
    top_k = ids.shape[1] if ids.dim() == 2 else 1
    return (offsets.to(torch.int32), (order // max(top_k, 1)).to(torch.int32),
            pair_rows.to(torch.int32))


def moe_combine(expert_out: Tensor, pair_rows: Tensor, weights: Tensor,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """out[t] = sum over s of weights[t, s] * expert_out[pair_rows[t * k + s]], in ``dtype``."""
    t, k = weights.shape
    rows = expert_out.to(dtype)[pair_rows.long()].view(t, k, expert_out.shape[1])
    return (rows * weights.to(dtype)[:, :, None]).sum(1)


def grouped_gemm(x: Tensor, weight: Tensor, offsets: Tensor,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """Rows offsets[e]:offsets[e + 1] of x [M, K] times weight[e]^T ([E, N, K]) -> [M, N]
    in ``dtype``."""
    out = torch.zeros(x.shape[0], weight.shape[1], dtype=dtype, device=x.device)
    bounds = offsets.tolist()
    for e in range(weight.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        out[a:b] = x[a:b].to(dtype) @ weight[e].to(dtype).t()
    return out


def moe_experts(x: Tensor, w_gate_up: Tensor, w_down: Tensor, ids: Tensor, weights: Tensor,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """The whole expert sum of one MoE layer, token by token: x [T, H], w_gate_up
    [E, 2I, H] (gate rows first), w_down [E, H, I], ids/weights [T, k] -> [T, H]."""
    out = torch.zeros(x.shape[0], w_down.shape[1], dtype=dtype, device=x.device)
    xd = x.to(dtype)
    for s in range(ids.shape[1]):
        e = ids[:, s].long()
        gate, up = torch.einsum("th,tnh->tn", xd, w_gate_up[e].to(dtype)).chunk(2, dim=-1)
        y = torch.einsum("ti,thi->th", torch.nn.functional.silu(gate) * up, w_down[e].to(dtype))
        out += weights[:, s].to(dtype)[:, None] * y
    return out
