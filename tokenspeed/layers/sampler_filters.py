"""The sampler filters (top-k, top-p, min-p) and the rich outputs, from merged shard state.

The ops give, per vocabulary shard, the (m, s, w, t) partials and the shard's k largest
x = logits / temperature; merged, they describe a row well enough to finish it here on
[rows, k] tensors. Every filter keeps an upper set of x (ties kept together), so the
processed distribution is {x >= tau} renormalised, and everything reduces to finding tau
and the kept mass: from the candidates when they provably hold it (the usual case:
top_k < 64, or a row whose top-p nucleus fits in 64 tokens), else from a second pass over
the logits (``mass_above``: a radix search over the fp32 order for top-p, then one pass
for the kept mass). docs/design.md gives the semantics and the tie rules.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import tokenspeed_ext as tse

# candidates the kernels can keep per row
MAX_CANDIDATES = 64

# rows [R] int64 (indices into the block's rows), thresholds [R, n] fp32, reference max
# [R] -> [R, n, 2] (mass, w) summed over each of those rows: a pass over only the rows
# that need it (usually a few of a block), so its cost follows them, not the block
MassAbove = Callable[[Tensor, Tensor, Tensor], Tensor]


def _mass_of_rows(mass_above: MassAbove, which: Tensor, thresholds: Tensor, ref_m: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """mass_above over the rows where ``which`` [T] holds: (rows [R], [R, n, 2])."""
    rows = which.nonzero()[:, 0]
    return rows, mass_above(rows, thresholds.index_select(0, rows).contiguous(),
                            ref_m.index_select(0, rows).contiguous())


def _put(dest: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    return dest.index_put((rows,), values)


# Sums over a row's candidates in an order fixed by the column alone: torch's row
# reductions and scans pick how they split a row among threads from the number of rows,
# which would make a row's bits depend on its block (deterministic mode promises not).
# Both are a few elementwise adds over [T, k <= 64].

def row_sum(x: Tensor) -> Tensor:
    """Sum over the last dim, pairwise: the halves added elementwise until one is left
    (zeros pad the width to a power of two)."""
    width = 1 << max(0, (x.shape[-1] - 1).bit_length())
    if width != x.shape[-1]:
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def row_cumsum(x: Tensor) -> Tensor:
    """Inclusive prefix sums over the last dim: step s adds to each place the partial
    sum s places back (log2(k) elementwise adds)."""
    step = 1
    while step < x.shape[-1]:
        x = torch.cat([x[..., :step], x[..., step:] + x[..., :-step]], dim=-1)
        step *= 2
    return x


@dataclass
class RowOptions:
    """Per scored row: filters (top_k [S] int64, 0 = off; top_p, min_p [S] fp32) and the
    rich outputs asked for (top_logprobs k; token_ids [S, n] int64, -1 = no id); ``plain``:
    the rows (int64 indices) of sequences that asked for plain log-probs only, None when
    there are none (every row is rich); with them, ``rich``: the other rows, None when
    there are none."""
    top_k: Tensor
    top_p: Tensor
    min_p: Tensor
    top_logprobs: int
    token_ids: Tensor | None
    candidates: int  # k of the ops: enough for the filters and the top_logprobs
    filtered: bool = True  # some row has a filter on (False: no candidates needed)
    plain: Tensor | None = None
    rich: Tensor | None = None

    @property
    def needs_candidates(self) -> bool:
        return self.filtered or self.top_logprobs > 0

    def rows(self, begin: int, end: int) -> RowOptions:
        """Rows begin .. end - 1: their rich options (``plain`` stays the whole batch's
        concern, None here)."""
        return RowOptions(self.top_k[begin:end], self.top_p[begin:end], self.min_p[begin:end],
                          self.top_logprobs,
                          None if self.token_ids is None else self.token_ids[begin:end],
                          self.candidates, self.filtered)

    def take(self, index: Tensor) -> RowOptions:
        """The rows ``index`` (int64, on the options' device): their rich options."""
        def sub(x: Tensor) -> Tensor:
            return x.index_select(0, index)
        return RowOptions(sub(self.top_k), sub(self.top_p), sub(self.min_p), self.top_logprobs,
                          None if self.token_ids is None else sub(self.token_ids),
                          self.candidates, self.filtered)


# candidates past the largest top_k: a group of equal values across the k-th place (bf16
# logits tie often: a few values share each representable step near the top) is settled
# from the list when it ends inside it; one that runs past the list costs a pass over the
# logits for the top-k set's mass
TIE_SLACK = 16


def candidate_count(top_logprobs: int, max_top_k: int, open_filter: bool) -> int:
    """Candidates per row: TIE_SLACK more than the largest top_k (at least one more shows
    whether a tie crosses the k-th place: the next candidate is then below it); all 64
    when a top-p or min-p row has no top_k (the nucleus usually fits)."""
    k = max(top_logprobs, max_top_k + TIE_SLACK if max_top_k > 0 else 0)
    if open_filter:
        k = MAX_CANDIDATES
    return max(1, min(k, MAX_CANDIDATES))


def in_order_sum(parts: Tensor) -> Tensor:
    """parts [S, ...] -> (parts[0] + parts[1]) + parts[2] ...: each element's sum in piece
    order whatever the other sizes, where torch's sum over dim 0 picks its split among
    threads from the number of outputs (on CUDA: from T)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def merge_state(partials: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shard partials [S, T, 4] merged in shard order -> (M, S, W, t) [T] fp32 (W relative
    to M), the formulas of docs/design.md."""
    m, s, w, t = partials.unbind(-1)
    if partials.shape[0] == 1:  # one shard: the formulas reduce to it (scale 1, shift 0)
        return m[0], s[0], w[0], t[0]
    big_m = m.max(0).values
    safe_m = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    empty = torch.isneginf(m)
    shift = torch.where(empty, torch.zeros_like(m), m - safe_m)
    scale = torch.where(empty, torch.zeros_like(m), shift.exp())
    return (big_m, in_order_sum(s * scale), in_order_sum((w + s * shift) * scale),
            t.max(0).values)


def merge_candidates(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Shards' candidates [S, T, k'] -> the k largest [T, k], ties to the lower id and
    the padding (id -1) after every real id: a stable sort by id, then a stable sort by
    value. One shard's list is already in that order."""
    if values.shape[0] == 1:
        return values[0, :, :k], ids[0, :, :k]
    vals = values.permute(1, 0, 2).reshape(values.shape[1], -1)
    idx = ids.permute(1, 0, 2).reshape(ids.shape[1], -1)
    by_id = torch.sort(torch.where(idx < 0, torch.full_like(idx, 2**62), idx), dim=1,
                       stable=True).indices
    by_value = torch.sort(vals.gather(1, by_id), dim=1, descending=True, stable=True).indices
    order = by_id.gather(1, by_value)[:, :k]
    return vals.gather(1, order), idx.gather(1, order)


def gather_token_logits(logits: Tensor, vocab_start: int, token_ids: Tensor,
                        temperature: float) -> Tensor:
    """x of the requested ids [T, n] that fall in this shard's columns, else -inf; x is
    rounded as the kernels round it (fp32 logit times the fp32 1 / temperature)."""
    local = token_ids - vocab_start  # an id -1 (none asked) is below every shard's start
    inside = (local >= 0) & (local < logits.shape[1])
    x = logits.gather(1, local.clamp(0, logits.shape[1] - 1)).float()
    if temperature != 1.0:  # x * 1 is x: the launch is skipped
        x = x * (1.0 / temperature)
    return torch.where(inside, x, -math.inf)


def to_key(x: Tensor) -> Tensor:
    """fp32 -> int64 in [0, 2^32) with the order of the floats (-0 just below +0)."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 2**31, bits ^ 0xFFFFFFFF, bits | 2**31)


def from_key(key: Tensor) -> Tensor:
    bits = torch.where(key >= 2**31, key ^ 2**31, key ^ 0xFFFFFFFF)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


@dataclass
class RichRows:
    """The outputs of a block of rows ([T] fp32, [T, k], [T, n])."""
    log_probs: Tensor
    entropy: Tensor
    top_ids: Tensor | None
    top_logprobs: Tensor | None
    token_logprobs: Tensor | None


def finish_rows(state: tuple[Tensor, Tensor, Tensor, Tensor], values: Tensor | None,
                ids: Tensor | None, token_x: Tensor | None, opts: RowOptions,
                mass_above: MassAbove) -> RichRows:
    """Filtered log-probs, entropy and rich outputs of merged rows.

    state: merge_state's (M, S, W, t); values, ids [T, kc]: the row's kc largest x (None
    when ``opts.needs_candidates`` is false);
    token_x [T, n]: x of the requested ids. ``mass_above`` runs a second pass over the
    whole of the rows it is given (every shard, summed in shard order); it is called only
    for the rows whose kept set is not provably inside the candidates, and then
    identically on every rank.
    """
    big_m, big_s, big_w, t = state
    # M where finite, else 0 (as torch.where(isfinite(M), M, 0)); every op here is a
    # launch on a few thousand rows, so the finish takes as few as give the same bits
    ref_m = torch.nan_to_num(big_m, nan=0.0, posinf=0.0, neginf=0.0)
    if not opts.filtered:  # the raw distribution: no threshold, the row's whole mass
        return _outputs(big_m, ref_m, t, None, big_s, big_w, values, ids, token_x, opts)
    # Every row from its candidates alone, in one op (a warp a row on CUDA), and the
    # outputs from that, all queued before the one wait on the device that tells whether
    # some row needs a pass over its logits (rarely): while the host waits the device
    # finishes the block, and the usual block returns from here.
    args = (values, ids, ref_m, big_s, big_w, opts.top_k, opts.top_p, opts.min_p)
    tau, s_kept, w_kept, pending = tse.filter_kept_set(*args)
    out = _outputs(big_m, ref_m, t, tau, s_kept, w_kept, values, ids, token_x, opts)
    search = torch.isnan(tau)
    # (kind, row): 0 asks for a pass at its tau, 1 needs the top-p search
    pend = torch.stack((pending & ~search, pending & search)).nonzero().cpu()
    if pend.shape[0] == 0:
        return out
    tau, s_kept, w_kept = _settle(args, tau, s_kept, w_kept, pend, opts, mass_above)
    return _outputs(big_m, ref_m, t, tau, s_kept, w_kept, values, ids, token_x, opts)


def _outputs(big_m: Tensor, ref_m: Tensor, t: Tensor, tau: Tensor | None, s_kept: Tensor,
             w_kept: Tensor, values: Tensor | None, ids: Tensor | None,
             token_x: Tensor | None, opts: RowOptions) -> RichRows:
    """The outputs of rows whose kept set is {x >= tau} (None: every x) with mass
    (s_kept, w_kept) relative to ref_m."""
    log_z = torch.log(s_kept)
    shift = ref_m + log_z
    # a row of -inf logits (M = -inf) scores NaN: unfiltered its S and W are 0 and every
    # x -inf, so x - shift = -inf + inf and log S - W / S = -inf - 0 / 0 are NaN already
    empty = None if tau is None else torch.isneginf(big_m)

    def logprob(x: Tensor) -> Tensor:
        def col(y: Tensor) -> Tensor:
            return y.view(-1, *[1] * (x.dim() - 1))
        lp = x - col(shift)
        if tau is None:
            return lp
        lp = torch.where(x >= col(tau), lp, -math.inf)
        return torch.where(col(empty), math.nan, lp)

    lp = logprob(t)
    ent = torch.addcdiv(log_z, w_kept, s_kept, value=-1)  # log S - W / S
    if empty is not None:
        ent = torch.where(empty, math.nan, ent)
    n = opts.top_logprobs
    return RichRows(lp, ent,
                    ids[:, :n] if n else None, logprob(values[:, :n]) if n else None,
                    None if token_x is None else logprob(token_x))


def _settle(args: tuple[Tensor, ...], tau: Tensor, s_kept: Tensor, w_kept: Tensor,
            pend: Tensor, opts: RowOptions, mass_above: MassAbove
            ) -> tuple[Tensor, Tensor, Tensor]:
    """The kept set (tau, s_kept, w_kept) of the rows filter_kept_set left pending (pend:
    its (kind, row) list on the host). The rows that ask for one pass (at their tau) get
    it, all in one, and the op runs again with their sums. Only a row that needs the
    top-p search, taken out of the block, goes through the steps below with their passes
    (each step waiting to learn which of them need it). Every step is per row, so a row's
    result never depends on the others."""
    values, ids, ref_m, big_s, big_w = args[:5]
    asks = pend[pend[:, 0] == 0, 1].to(tau.device)
    if asks.shape[0]:
        mass = mass_above(asks, tau.index_select(0, asks)[:, None].contiguous(),
                          ref_m.index_select(0, asks).contiguous())
        pass_mass = torch.full((tau.shape[0], 2), math.nan, device=tau.device)
        pass_mass.index_copy_(0, asks, mass[:, 0])
        tau, s_kept, w_kept, _ = tse.filter_kept_set(*args, pass_mass)
    rows = pend[pend[:, 0] == 1, 1].to(tau.device)
    if rows.shape[0]:

        def sub(x: Tensor) -> Tensor:
            return x.index_select(0, rows)

        sub_opts = opts.take(rows)
        # the steps' row indices are into the subset: the pass gets the block's
        slow = _kept_set_steps(sub(big_s), sub(big_w), sub(ref_m), sub(values), sub(ids),
                               sub_opts, lambda r, thr, rm: mass_above(rows[r], thr, rm),
                               passes=True)
        tau, s_kept, w_kept = (_put(x, rows, y)
                               for x, y in zip((tau, s_kept, w_kept), slow[:3]))
    return tau, s_kept, w_kept


def _kept_set_steps(big_s: Tensor, big_w: Tensor, ref_m: Tensor, values: Tensor, ids: Tensor,
                    opts: RowOptions, mass_above: MassAbove, passes: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kept set's steps, those of the filter_kept_set op (csrc/kept_set.h) in the same
    fp32 order, with the passes: (tau, s_kept, w_kept, rows that need a pass [T] bool).
    Without ``passes`` those rows are only marked, their results not final but their tau
    the threshold of the one pass they need (NaN: the top-p search), as the op gives them
    (its reference in the tests).

    Every x above the last candidate is a candidate, so a group of equal values is
    missing members only when it is the last one. The top-k set is therefore settled
    from the candidates but for its mass when a tie at the k-th place runs past them
    (one pass, ``mass_above`` at tau_k); with that mass every kept/dropped decision of
    top-p inside the candidates is exact, and only a top-p row without top-k whose
    nucleus holds every candidate needs the radix search.
    """
    neg = torch.full_like(big_s, -math.inf)
    kc = values.shape[1]
    d = values - ref_m[:, None]
    e = torch.where(torch.isneginf(values), torch.zeros_like(d), d.exp())
    ew = torch.where(e > 0, e * d, torch.zeros_like(d))
    last = values[:, -1]
    complete = ids[:, -1] < 0  # the candidates are every column of the row

    def inside_list(tau: Tensor) -> Tensor:
        """The whole set {x >= tau} is among the candidates."""
        return complete | (last < tau)

    e_ew = torch.stack((e, ew))  # both sums in one chain of adds

    def list_mass(tau: Tensor) -> tuple[Tensor, Tensor]:
        sums = row_sum(e_ew * (values >= tau[:, None]))
        return sums[0], sums[1]

    # top-k: the k-th largest x (kc > top_k unless top_k = 64); a tie across the last
    # candidate takes one pass for the set's mass
    has_k = opts.top_k > 0
    has_p = opts.top_p < 1.0
    tau_m = torch.where(opts.min_p > 0, ref_m + torch.log(opts.min_p), neg)
    kth = values.gather(1, (opts.top_k - 1).clamp(0, kc - 1)[:, None])[:, 0]
    tau_k = torch.where(has_k, kth, neg)
    s_k, w_k = list_mass(tau_k)
    s_k = torch.where(has_k, s_k, big_s)
    w_k = torch.where(has_k, w_k, big_w)
    # the set's mass is wanted by top-p, or when tau_k is the threshold (a min-p cut
    # above it lies inside the list)
    short_k = has_k & ~inside_list(tau_k) & (has_p | (tau_m <= tau_k))
    if passes and bool(short_k.any()):
        rows, again = _mass_of_rows(mass_above, short_k, tau_k[:, None], ref_m)
        s_k = _put(s_k, rows, again[:, 0, 0])
        w_k = _put(w_k, rows, again[:, 0, 1])

    # top-p over the top-k set: drop a token when the kept mass strictly above its value
    # is >= p * S_k; ties share their group's first position
    kept_k = values >= tau_k[:, None]
    ek = e * kept_k
    excl = row_cumsum(ek) - ek
    pos = torch.arange(kc, device=values.device).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    group_first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
    above = excl.gather(1, group_first)
    bound = (opts.top_p * s_k)[:, None]
    kept_p = kept_k & (above < bound)
    dropped = kept_k & (above >= bound)
    tau_p = torch.where(kept_p, values, torch.full_like(values, math.inf)).min(1).values
    known_p = has_k | dropped.any(1) | complete
    tau_p = torch.where(has_p, tau_p, neg)
    search = has_p & ~known_p
    if passes and bool(search.any()):
        rows = search.nonzero()[:, 0]
        found = _search_top_p(rows, tau_k.index_select(0, rows), opts.top_p.index_select(0, rows),
                              ref_m.index_select(0, rows), mass_above)
        tau_p = _put(tau_p, rows, found)

    tau = torch.maximum(torch.maximum(tau_k, tau_p), tau_m)
    s_kept, w_kept = list_mass(tau)
    open_set = torch.isneginf(tau)
    s_kept = torch.where(open_set, big_s, s_kept)
    w_kept = torch.where(open_set, big_w, w_kept)
    # the top-k set itself, its mass already summed
    at_k = has_k & (tau == tau_k) & ~open_set
    s_kept = torch.where(at_k, s_k, s_kept)
    w_kept = torch.where(at_k, w_k, w_kept)
    need = ~open_set & ~at_k & ~inside_list(tau)
    if passes and bool(need.any()):
        rows, again = _mass_of_rows(mass_above, need, tau[:, None], ref_m)
        s_kept = _put(s_kept, rows, again[:, 0, 0])
        w_kept = _put(w_kept, rows, again[:, 0, 1])
    pending = short_k | search | need
    if not passes:
        asked = torch.where(search, math.nan, torch.where(short_k, tau_k, tau))
        tau = torch.where(pending, asked, tau)
    return tau, s_kept, w_kept, pending


def _search_top_p(rows: Tensor, tau_k: Tensor, top_p: Tensor, ref_m: Tensor,
                  mass_above: MassAbove) -> Tensor:
    """The top-p threshold of the given rows (tau_k, top_p, ref_m: theirs, [R]) by a
    radix search over the fp32 order: four passes of 256 thresholds each fix 8 bits of
    the largest key K with mass(x >= max(float(K), tau_k)) >= p * mass(x >= tau_k). The first threshold of the
    first pass is tau_k itself, so the target comes from the same sums it is compared to."""
    digits = torch.arange(256, device=tau_k.device, dtype=torch.int64)
    prefix = torch.zeros_like(tau_k, dtype=torch.int64)
    target = None
    for shift in (24, 16, 8, 0):
        keys = prefix[:, None] | (digits << shift)
        thr = from_key(keys)
        # keys below -inf's are nan patterns: as thresholds they mean "everything"
        thr = torch.where(torch.isnan(thr) & (keys < 2**31), torch.full_like(thr, -math.inf),
                          thr)
        thr = torch.where(torch.isnan(thr), thr, torch.maximum(thr, tau_k[:, None]))
        mass = mass_above(rows, thr.contiguous(), ref_m)[:, :, 0]
        if target is None:
            target = top_p * mass[:, 0]
        reach = (mass >= target[:, None]).sum(1) - 1  # monotone in the threshold
        prefix = prefix | (reach.clamp_min(0) << shift)
    return torch.maximum(from_key(prefix), tau_k)
