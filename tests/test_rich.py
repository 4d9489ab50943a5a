"""Rich scoring outputs: the top-k partials and mass ops against tokenspeed_ext.reference,
the sampler filters (top-k, top-p, min-p) over any vocabulary split against the float64
spec (reference.sampler_logprobs), the engine against HF fp32 logits filtered by the
spec (whole rows, lean chunks, tensor parallelism on gloo), torch.compile, bad arguments.

Membership in a filtered set is decided by comparisons that fp32 and fp64 can answer
differently only at a boundary: draws whose spec puts a cumulative mass or a min-p
ratio within 1e-6 of its bound are skipped (hypothesis.assume), not loosened.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from op_testing import FLOATS, SETTINGS, assert_each_raises, sanitized_dtypes, seeds

import tokenspeed_ext as tse
import tokenspeed_ext.ops  # noqa: F401 - registers torch.ops.tokenspeed.*
from tokenspeed.inputs import InvalidSequenceError
from tokenspeed.layers.sampler_filters import (RowOptions, _kept_set_steps, candidate_count,
                                               finish_rows,
                                               from_key, gather_token_logits, in_order_sum,
                                               merge_candidates, merge_state, row_cumsum,
                                               row_sum)
from tokenspeed.rich import plan, row_options
from tokenspeed_ext import reference as ref

TOL = 2e-5  # fp32 log-probs of O(10) logits against float64


def draw_logits(g, t, v, dtype, device, ties):
    x = torch.randn(t, v, generator=g, dtype=torch.float64) * 3
    if ties:  # quantised: many equal values, also across shard and candidate boundaries
        x = (x * 2).round() / 2
    return x.to(dtype).to(device)


def boundary_safe(x: torch.Tensor, temperature: float, ks, ps, mins) -> bool:
    """No top-p prefix mass and no min-p ratio of the float64 spec within 1e-6 of its
    bound, where fp32 arithmetic could decide the other way."""
    xs = x.double().cpu() / temperature
    for r in range(xs.shape[0]):
        keep = ref.sampler_keep(xs[r], int(ks[r]), 1.0, 0.0)
        probs = torch.softmax(torch.where(keep, xs[r], -math.inf), -1)
        vals = torch.unique(xs[r][keep], sorted=True).flip(0)
        mass = torch.stack([probs[xs[r] >= v].sum() for v in vals])
        if ps[r] < 1.0 and (mass - ps[r]).abs().min() < 1e-6:
            return False
        if mins[r] > 0.0:
            keep = ref.sampler_keep(xs[r], int(ks[r]), float(ps[r]), 0.0)
            p = torch.softmax(torch.where(keep, xs[r], -math.inf), -1)
            if ((p[keep] / p.max()) - mins[r]).abs().min() < 1e-6:
                return False
    return True


def score_split(logits, targets, temperature, opts, bounds):
    """The head's computation over vocabulary pieces [a, b): ops per piece, merged."""
    pieces = list(zip(bounds[:-1], bounds[1:]))
    outs = [tse.logprob_topk_partials(logits[:, a:b], targets, a, temperature, opts.candidates)
            for a, b in pieces]
    state = merge_state(torch.stack([o[0] for o in outs]))
    values, ids = merge_candidates(torch.stack([o[1] for o in outs]),
                                   torch.stack([o[2] for o in outs]), opts.candidates)
    token_x = None
    if opts.token_ids is not None:
        token_x = torch.stack([gather_token_logits(logits[:, a:b], a, opts.token_ids,
                                                   temperature) for a, b in pieces]).max(0).values

    def mass_above(rows, thresholds, ref_m):
        return in_order_sum(torch.stack([tse.logprob_mass_above(logits[rows, a:b],
                                                                temperature, thresholds, ref_m)
                                         for a, b in pieces]))

    return finish_rows(state, values, ids, token_x, opts, mass_above)


def assert_scores(got, want, what, tol=TOL):
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf differs"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: nan differs"
    fin = torch.isfinite(want)
    if fin.any():
        err = (got[fin] - want[fin]).abs().max().item()
        assert err <= tol * (1 + want[fin].abs().max().item()), f"{what}: error {err:.3g}"


# ---- ops ----

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, **SETTINGS)
@given(seed=seeds, t=st.integers(1, 6), v=st.integers(1, 700), k=st.integers(1, 64),
       dtype=st.sampled_from(FLOATS), temperature=st.floats(0.3, 3.0), ties=st.booleans(),
       start=st.integers(0, 1000))
def test_topk_partials_match_reference(device, seed, t, v, k, dtype, temperature, ties, start):
    g = torch.Generator().manual_seed(seed)
    logits = draw_logits(g, t, v, dtype, device, ties)
    targets = torch.randint(start, start + v, (t,), generator=g).to(device)
    parts, vals, ids = tse.logprob_topk_partials(logits, targets, start, temperature, k)
    want_p, want_v, want_i = ref.logprob_topk_partials(logits, targets, start, temperature, k)
    assert vals.shape == ids.shape == (t, k) and ids.dtype == torch.int64
    assert torch.equal(ids.cpu(), want_i), "ids (ties to the lower id, -1 past the shard)"
    torch.testing.assert_close(vals.double().cpu(), want_v, rtol=1e-6, atol=1e-6)
    # the partials are exactly logprob_partials'
    assert torch.equal(parts, tse.logprob_partials(logits, targets, start, temperature))
    torch.testing.assert_close(parts.double().cpu(), want_p.double().cpu(), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, **SETTINGS)
@given(seed=seeds, t=st.integers(1, 5), v=st.integers(1, 500), n=st.integers(1, 9),
       dtype=st.sampled_from(FLOATS), temperature=st.floats(0.3, 3.0))
def test_mass_above_matches_reference(device, seed, t, v, n, dtype, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = draw_logits(g, t, v, dtype, device, True)
    x = logits.float() * (1.0 / temperature)
    # thresholds at logits of the row (equality counts), between them, and beyond
    cols = torch.randint(0, v, (t, n), generator=g).to(device)
    thr = x.gather(1, cols) + torch.tensor([0.0, 0.25, -math.inf, math.inf])[
        torch.randint(0, 4, (t, n), generator=g)].to(device)
    ref_m = x.max(1).values
    got = tse.logprob_mass_above(logits, temperature, thr.contiguous(), ref_m)
    want = ref.logprob_mass_above(logits, temperature, thr, ref_m)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-5)


# ---- real vocabularies and the CUDA block top-k's paths ----

def pattern_logits(pattern: str, t: int, v: int, dtype, gen) -> torch.Tensor:
    """Rows that drive each path of the row top-k: random (the bound from the thread
    maxima keeps few candidates), ascending (the largest values crowd into few threads,
    many elements each), constant (every thread and column ties: more reaching threads
    or candidates than the kernel lists, so the radix select over composites runs) and
    quantised."""
    if pattern == "random":
        x = torch.randn(t, v, generator=gen, dtype=torch.float64) * 4
    elif pattern == "ascending":
        x = torch.linspace(-8, 8, v, dtype=torch.float64).expand(t, v).clone()
    elif pattern == "constant":
        x = torch.full((t, v), 1.5, dtype=torch.float64)
    else:
        x = (torch.randn(t, v, generator=gen, dtype=torch.float64) * 2).round()
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("pattern", ["random", "ascending", "constant", "quantised"])
@pytest.mark.parametrize("v", [151936, 32769, 100])
def test_topk_partials_kernel_paths(device, dtype, pattern, v):
    gen = torch.Generator().manual_seed(v)
    wide = pattern_logits(pattern, 3, v + 5, dtype, gen).to(device)
    logits = wide[:, 1:v + 1]  # strided, unaligned rows
    targets = torch.randint(0, v, (3,), generator=gen).to(device) + 7
    for k in (1, 20, 64):
        parts, vals, ids = tse.logprob_topk_partials(logits, targets, 7, 0.7, k)
        want_p, want_v, want_i = ref.logprob_topk_partials(logits, targets, 7, 0.7, k)
        assert torch.equal(ids.cpu(), want_i), (pattern, k)
        torch.testing.assert_close(vals.double().cpu(), want_v, rtol=1e-6, atol=1e-6)
        assert torch.equal(parts, tse.logprob_partials(logits, targets, 7, 0.7))
        # a row's candidates do not depend on the other rows
        one = tse.logprob_topk_partials(logits[1:2].contiguous(), targets[1:2], 7, 0.7, k)
        assert torch.equal(one[2], ids[1:2]) and torch.equal(one[1], vals[1:2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_mass_above_cuda_real_vocabulary(dtype):
    gen = torch.Generator().manual_seed(5)
    logits = pattern_logits("quantised", 4, 151936, dtype, gen).cuda()
    x = logits.float() * (1.0 / 0.9)
    ref_m = x.max(1).values
    thr = torch.sort(x[:, torch.randint(0, 151936, (256,), generator=gen).cuda()], 1).values
    thr[:, :3] = -math.inf
    thr[:, 7] = math.nan
    got = tse.logprob_mass_above(logits, 0.9, thr.contiguous(), ref_m)
    want = ref.logprob_mass_above(logits, 0.9, thr, ref_m)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sanitized_dtypes(*FLOATS))
def test_rich_kernels_small(dtype):
    """Every rich-output kernel path on rows small enough for compute-sanitizer: row
    top-k (listed threads and buffered candidates; the radix select over composites when
    the candidates overflow the buffer, as in 16-bit constant rows, or the reaching
    threads overflow the list, as in fp32 ones), the one-threshold and the binned mass
    pass, aligned and unaligned rows."""
    gen = torch.Generator().manual_seed(2)
    v = 40000  # two chunks (512 thread maxima) in 16-bit types, three (768) in fp32
    for pattern in ("random", "ascending", "quantised", "constant"):
        wide = pattern_logits(pattern, 2, v + 1, dtype, gen).cuda()
        for logits in (wide[:, :v], wide[:, 1:]):  # aligned and unaligned rows
            targets = torch.randint(0, v, (2,), generator=gen).cuda()
            for k in (3, 64):
                _, vals, ids = tse.logprob_topk_partials(logits, targets, 0, 0.7, k)
                _, want_v, want_i = ref.logprob_topk_partials(logits, targets, 0, 0.7, k)
                assert torch.equal(ids.cpu(), want_i), (pattern, k)
                torch.testing.assert_close(vals.double().cpu(), want_v, rtol=1e-6, atol=1e-6)
            if pattern == "constant":
                continue  # the reference's w of a constant row is rounding noise
            ref_m = (logits.float() * (1 / 0.7)).max(1).values
            for n in (1, 3):
                thr = vals[:, :n].flip(1).contiguous()
                got = tse.logprob_mass_above(logits, 0.7, thr, ref_m)
                want = ref.logprob_mass_above(logits, 0.7, thr, ref_m)
                torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


# ---- the mass pass: the same bits wherever a row sits ----

def mass_thresholds(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """[R, n] fp32 thresholds for x [R, V]: values of the row (equal x count), with -inf
    and nan among them when n > 1; n = 256 as the top-p search's first pass makes them
    (keys spread over the whole fp32 order, so most x fall into a few bins; the lowest
    raised to a value of the row, so many are equal) plus one nan."""
    rows, v = x.shape
    picked = x.gather(1, torch.randint(0, v, (rows, n), generator=gen).to(x.device))
    if n == 256:
        keys = (torch.arange(256, dtype=torch.int64) << 24).expand(rows, 256).to(x.device)
        thr = from_key(keys)
        thr = torch.where(torch.isnan(thr), -math.inf, thr)  # key 0: a nan pattern
        picked = torch.maximum(thr, picked[:, :1])
        picked[:, 100] = math.nan
    elif n > 1:
        picked[:, 1] = -math.inf
        picked[:, -1] = math.nan
    return picked.contiguous()


def assert_mass_wherever_the_row_sits(logits, temperature, thr, ref_m, gen):
    """Each row's mass_above [n, 2] is bitwise the same as in the batch [R, V] when the
    row is alone, reversed among other rows of a larger batch, and in rows of stride V + 1
    with and without a one-column offset (16-byte aligned row starts and unaligned ones,
    varying by row); it never grows with the threshold, and equal thresholds give equal
    sums (the top-p search relies on both)."""
    rows, v = logits.shape
    want = tse.logprob_mass_above(logits, temperature, thr, ref_m)
    for r in range(rows):
        alone = tse.logprob_mass_above(logits[r:r + 1], temperature, thr[r:r + 1],
                                       ref_m[r:r + 1])
        assert torch.equal(alone[0], want[r]), f"row {r} alone"
    other = draw_logits(gen, 3, v, logits.dtype, logits.device, False)
    batch = torch.cat([other[:2], logits.flip(0), other[2:]])
    got = tse.logprob_mass_above(batch, temperature,
                                 torch.cat([thr[:1], thr[:1], thr.flip(0), thr[:1]]),
                                 torch.cat([ref_m[:1], ref_m[:1], ref_m.flip(0), ref_m[:1]]))
    assert torch.equal(got[2:2 + rows].flip(0), want), f"rows among {rows + 3}"
    for offset in (0, 1):
        wide = torch.empty(rows, v + 1, dtype=logits.dtype, device=logits.device)
        wide[:, offset:offset + v] = logits
        got = tse.logprob_mass_above(wide[:, offset:offset + v], temperature, thr, ref_m)
        assert torch.equal(got, want), f"row stride {v + 1}, offset {offset}"
    for r in range(rows):
        valid = ~torch.isnan(thr[r])
        t, order = thr[r, valid].sort()
        mass = want[r, valid][order, 0]
        assert (mass[1:] <= mass[:-1]).all(), f"row {r}: mass grows with the threshold"
        same = t[1:] == t[:-1]
        assert torch.equal(mass[1:][same], mass[:-1][same]), f"row {r}: equal thresholds"


def check_mass_placement(device, dtype, v, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = draw_logits(gen, 3, v, dtype, device, True)
    logits[1, ::5] = -math.inf
    x = logits.float() * (1 / 0.7)
    ref_m = x.max(1).values
    for n in (1, 5, 256):
        thr = mass_thresholds(x, n, gen)
        assert_mass_wherever_the_row_sits(logits, 0.7, thr, ref_m, gen)
        if 3 * n * v <= 2e7:  # the float64 reference holds [R, n, V]
            got = tse.logprob_mass_above(logits, 0.7, thr, ref_m)
            want = ref.logprob_mass_above(logits, 0.7, thr, ref_m)
            torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("v", [7, 100, 1003, 20000, 151936])
def test_mass_above_same_bits_wherever_the_row_sits(device, dtype, v):
    """V below the vector width, below the block, not a multiple of the vector width, a
    few column segments with a partial last one, and a real vocabulary."""
    check_mass_placement(device, dtype, v, v)


@pytest.mark.gpu
@pytest.mark.sanitize
def test_mass_above_placement_small():
    """Both mass kernels on small rows (one and three column segments in bf16, aligned
    and unaligned starts), cheap enough for compute-sanitizer."""
    for v in (1003, 20000):
        check_mass_placement("cuda", torch.bfloat16, v, v + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mass_above_cuda_same_bits_every_call(dtype):
    """The binned pass (n > 1) gives the same bits call after call: with the search's
    thresholds most x of a row fall into a few bins, where additions in an order that
    depends on the timing of the warps would show in the last bits."""
    gen = torch.Generator().manual_seed(9)
    logits = draw_logits(gen, 64, 151936, dtype, "cuda", True)
    x = logits.float() * (1 / 0.8)
    ref_m = x.max(1).values
    for n in (3, 256):
        thr = mass_thresholds(x, n, gen)
        first = tse.logprob_mass_above(logits, 0.8, thr, ref_m)
        for _ in range(10):
            assert torch.equal(tse.logprob_mass_above(logits, 0.8, thr, ref_m), first), n


# ---- the filters over vocabulary splits, against the float64 spec ----

filter_cases = st.fixed_dictionaries(dict(
    seed=seeds,
    dtype=st.sampled_from(FLOATS),
    temperature=st.one_of(st.just(1.0), st.floats(0.2, 4.0)),
    ties=st.booleans(),
    top_logprobs=st.sampled_from([0, 1, 5, 64]),
    top_k=st.lists(st.sampled_from([0, 1, 2, 7, 50, 63, 64]), min_size=1, max_size=6),
    top_p=st.lists(st.one_of(st.just(1.0), st.floats(0.05, 1.0)), min_size=6, max_size=6),
    min_p=st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.9)), min_size=6, max_size=6),
    cuts=st.lists(st.floats(0.0, 1.0), max_size=4),
    filtered_target=st.booleans(),
))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=80, **SETTINGS)
@given(case=filter_cases, v=st.one_of(st.integers(1, 40), st.integers(41, 900)),
       n_ids=st.integers(0, 4))
def test_filters_over_splits_match_spec(device, case, v, n_ids):
    g = torch.Generator().manual_seed(case["seed"])
    rows = len(case["top_k"])
    logits = draw_logits(g, rows, v, case["dtype"], device, case["ties"])
    temp = case["temperature"]
    ks = torch.tensor(case["top_k"])
    ps = torch.tensor(case["top_p"][:rows], dtype=torch.float32)
    mins = torch.tensor(case["min_p"][:rows], dtype=torch.float32)
    assume(boundary_safe(logits, temp, ks, ps.double(), mins.double()))
    targets = torch.randint(0, v, (rows,), generator=g)
    if case["filtered_target"]:  # the row's smallest logit: filtered whenever a filter bites
        targets = logits.float().cpu().argmin(1)
    token_ids = torch.randint(-1, v, (rows, n_ids), generator=g)
    open_filter = bool(((ks == 0) & ((ps < 1) | (mins > 0))).any())
    opts = RowOptions(ks.to(device), ps.to(device), mins.to(device), case["top_logprobs"],
                      token_ids.to(device),
                      candidate_count(case["top_logprobs"], int(ks.max()), open_filter))
    bounds = sorted({0, v, *(int(c * v) for c in case["cuts"])})
    got = score_split(logits, targets.to(device), temp, opts, bounds)
    want = ref.sampler_logprobs(logits, targets, temp, ks, ps.double(), mins.double(),
                                case["top_logprobs"], token_ids.clamp_min(0).tolist())
    assert_scores(got.log_probs, want["log_probs"], "log_probs")
    assert_scores(got.entropy, want["entropy"], "entropy")
    if case["top_logprobs"]:
        assert torch.equal(got.top_ids.cpu(), want["top_ids"])
        assert_scores(got.top_logprobs, want["top_logprobs"], "top_logprobs")
    want_tok = torch.stack(want["token_logprobs"]) if rows else None
    if n_ids:
        want_tok = torch.where(token_ids < 0, -math.inf, want_tok)
        assert_scores(got.token_logprobs, want_tok, "token_logprobs")
    # every split gives the same scores as one piece, up to rounding
    whole = score_split(logits, targets.to(device), temp, opts, [0, v])
    assert_scores(whole.log_probs, got.log_probs.double(), "split invariance")


@pytest.mark.parametrize("device", DEVICES)
def test_filters_off_equal_the_plain_op(device):
    g = torch.Generator().manual_seed(3)
    logits = draw_logits(g, 7, 300, torch.bfloat16, device, False)
    targets = torch.randint(0, 300, (7,), generator=g).to(device)
    zeros = torch.zeros(7, dtype=torch.int64, device=device)
    opts = RowOptions(zeros, torch.ones(7, device=device), torch.zeros(7, device=device), 3,
                      None, 3)
    got = score_split(logits, targets, 0.8, opts, [0, 300])
    lp, ent = tse.logprobs(logits, targets, 0.8, return_entropy=True)
    torch.testing.assert_close(got.log_probs, lp, rtol=0, atol=2e-6)
    torch.testing.assert_close(got.entropy, ent, rtol=0, atol=2e-6)


def test_row_options_list_the_plain_rows():
    """A batch's rows come in runs of one call each. The rows of runs without rich options
    (None) and of sequences that ask nothing of their own (in a call without top_logprobs
    or call-wide ids) are listed as plain; a batch whose rows are all plain and ask no
    extra output takes the plain path (None)."""
    cpu = torch.device("cpu")
    seqs = [([1, 2], [3, 4, 5]), ([6], [7])]
    call = plan([{}, {"top_k": 5}], seqs, 50, {})  # rows 0-2 plain, row 3 filtered
    runs = [(None, torch.arange(2)), (call, torch.arange(4)), (None, torch.arange(0)),
            (None, torch.arange(3))]
    opts = row_options(runs, cpu)
    assert opts.plain.tolist() == [0, 1, 2, 3, 4, 6, 7, 8] and opts.rich.tolist() == [5]
    assert opts.top_k.tolist() == [0, 0, 0, 0, 0, 5, 0, 0, 0]
    opts = row_options([(call, torch.arange(3, 4)), (None, torch.arange(0))], cpu)
    assert opts.plain is None and opts.rich is None
    assert row_options([(call, torch.arange(3)), (None, torch.arange(2))], cpu) is None
    assert row_options([(None, torch.arange(3))], cpu) is None
    # requested ids (an extra output) keep the rich path; its plain rows are still listed
    ids = plan([{}, {"token_ids": [1, 2]}], seqs, 50, {})
    opts = row_options([(ids, torch.arange(3))], cpu)
    assert opts.plain.tolist() == [0, 1, 2] and opts.rich is None
    # top_logprobs or call-wide ids: every row asks something
    assert plan([{}, {}], seqs, 50, {"top_logprobs": 2}).plain is None
    assert plan([{}, {"top_k": 3}], seqs, 50, {"token_ids": [4]}).plain is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("filtered", [False, True])
def test_rows_of_minus_inf_score_nan(device, filtered):
    """A row whose logits are all -inf (a masked or empty shard's worth) scores NaN in
    every output, as the spec's softmax over nothing; a row with some -inf columns scores
    as the spec, its -inf columns -inf."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 90, generator=g)
    logits[1] = -math.inf
    logits[2, ::3] = -math.inf
    logits = logits.to(device)
    targets = torch.tensor([4, 7, 3, 50])
    ks = torch.tensor([2, 0, 5, 0] if filtered else [0] * 4)
    ps = torch.tensor([0.9, 0.8, 1.0, 1.0] if filtered else [1.0] * 4)
    mins = torch.tensor([0.0, 0.1, 0.0, 0.2] if filtered else [0.0] * 4)
    token_ids = torch.tensor([[0, 3, -1]] * 4)
    opts = RowOptions(ks.to(device), ps.to(device), mins.to(device), 3, token_ids.to(device),
                      candidate_count(3, int(ks.max()), filtered), filtered)
    got = score_split(logits, targets.to(device), 1.0, opts, [0, 40, 90])
    want = ref.sampler_logprobs(logits, targets, 1.0, ks, ps.double(), mins.double(), 3,
                                token_ids.clamp_min(0).tolist())
    assert bool(got.log_probs[1].isnan()) and bool(got.entropy[1].isnan())
    assert_scores(got.log_probs, want["log_probs"], "log_probs")
    assert_scores(got.entropy, want["entropy"], "entropy")
    assert_scores(got.top_logprobs, want["top_logprobs"], "top_logprobs")
    want_tok = torch.where(token_ids < 0, -math.inf, torch.stack(want["token_logprobs"]))
    want_tok[1] = math.nan
    assert_scores(got.token_logprobs, want_tok, "token_logprobs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_p, min_p, passes", [(1.0, 0.0, 1), (0.3, 0.0, 1), (0.97, 0.0, 1),
                                                  (1.0, 0.5, 0), (0.5, 0.5, 1)])
def test_tie_past_the_candidates_takes_one_pass(device, top_p, min_p, passes):
    """A tie at the k-th place that runs past the candidates costs one pass over the
    logits (the top-k set's mass) of the rows that have it, never the top-p radix search,
    and scores exactly; none when min-p cuts above the tie and no top-p needs the set's
    mass."""
    g = torch.Generator().manual_seed(11)
    v, k = 500, 50
    x = torch.randn(4, v, generator=g, dtype=torch.float64)
    x[1:, 40:140] = 4.0  # 100 equal values across the k-th place and the candidates
    x[:, 5] = 6.0  # (the first row has no tie: its set is settled from the list)
    logits = x.to(torch.float32).to(device)
    targets = torch.tensor([7, 90, 5, 300]).to(device)
    ks = torch.full((4,), k)
    ps = torch.full((4,), top_p)
    mins = torch.full((4,), min_p)
    opts = RowOptions(ks.to(device), ps.to(torch.float32).to(device),
                      mins.to(torch.float32).to(device), 4, None, candidate_count(4, k, False))
    parts, values, ids = tse.logprob_topk_partials(logits, targets, 0, 1.0, opts.candidates)
    seen = []

    def mass_above(rows, thresholds, ref_m):
        seen.append((rows.tolist(), thresholds.shape[1]))
        return tse.logprob_mass_above(logits[rows], 1.0, thresholds, ref_m)

    got = finish_rows(merge_state(parts[None]), values, ids, None, opts, mass_above)
    assert seen == [([1, 2, 3], 1)] * passes, f"passes over the logits: {seen}"
    # the rows that took the pass, and the one that did not, score as they do alone
    for r in range(4):
        alone = finish_rows(merge_state(parts[None, r:r + 1]), values[r:r + 1], ids[r:r + 1],
                            None, opts.rows(r, r + 1),
                            lambda rows, thr, rm, r=r: mass_above(rows + r, thr, rm))
        assert torch.equal(alone.log_probs, got.log_probs[r:r + 1])
        assert torch.equal(alone.entropy, got.entropy[r:r + 1])
    want = ref.sampler_logprobs(logits, targets.cpu(), 1.0, ks, ps.double(), mins.double(), 4)
    assert_scores(got.log_probs, want["log_probs"], "log_probs")
    assert_scores(got.entropy, want["entropy"], "entropy")
    assert_scores(got.top_logprobs, want["top_logprobs"], "top_logprobs")


@pytest.mark.parametrize("device", DEVICES)
def test_tie_ending_inside_the_candidates_takes_no_pass(device):
    """A group of equal values across the k-th place that ends before the last candidate
    (the usual bf16 tie: the candidates run TIE_SLACK past top_k) is settled from the
    list: no pass over the logits, and the scores are exact."""
    g = torch.Generator().manual_seed(12)
    v, k = 500, 50
    x = torch.randn(4, v, generator=g, dtype=torch.float64)
    x[:, :45] += 10.0  # 45 values above the group
    x[:, 200:210] = 9.0  # places 45-54: across the 50th, ending inside the list
    logits = x.to(torch.float32).to(device)
    targets = torch.tensor([203, 5, 300, 209]).to(device)
    ks = torch.full((4,), k)
    ps = torch.tensor([1.0, 0.9, 0.5, 1.0])
    mins = torch.tensor([0.0, 0.0, 0.0, 1e-4])
    count = candidate_count(0, k, False)
    assert count >= 55, count
    opts = RowOptions(ks.to(device), ps.to(torch.float32).to(device),
                      mins.to(torch.float32).to(device), 0, None, count)
    parts, values, ids = tse.logprob_topk_partials(logits, targets, 0, 1.0, count)

    def mass_above(rows, thresholds, ref_m):
        raise AssertionError("a pass over the logits for a tie inside the candidates")

    got = finish_rows(merge_state(parts[None]), values, ids, None, opts, mass_above)
    want = ref.sampler_logprobs(logits, targets.cpu(), 1.0, ks, ps.double(), mins.double(), 0)
    assert_scores(got.log_probs, want["log_probs"], "log_probs")
    assert_scores(got.entropy, want["entropy"], "entropy")


def candidate_lists(g, rows: int, kc: int, device):
    """Random merged rows as the head sees them: candidates [rows, kc] (descending, ties,
    some rows complete: -inf and id -1 past their columns), the state (ref_m, S, W) and
    per-row filters, every kind mixed."""
    vals = torch.sort((torch.randn(rows, kc, generator=g) * 2).round() / 4, 1,
                      descending=True).values
    ids = torch.randperm(1000, generator=g)[:kc].expand(rows, kc).clone()
    width = torch.randint(1, kc + 1, (rows,), generator=g)
    short = (torch.rand(rows, generator=g) < 0.3)[:, None] & (torch.arange(kc) >= width[:, None])
    vals[short], ids[short] = -math.inf, -1
    ref_m = vals[:, 0] + torch.rand(rows, generator=g) * 0.5
    list_s = torch.where(torch.isneginf(vals), 0, (vals - ref_m[:, None]).exp()).sum(1)
    complete = ids[:, -1] < 0
    big_s = torch.where(complete, list_s, list_s * (1 + torch.rand(rows, generator=g) * 3))
    big_w = -torch.rand(rows, generator=g) * big_s
    pick = torch.randint(0, 3, (3, rows), generator=g)
    top_k = torch.where(pick[0] == 0, 0, torch.randint(1, kc + 1, (rows,), generator=g))
    top_p = torch.where(pick[1] == 0, 1.0, torch.rand(rows, generator=g) * 0.98 + 0.01)
    min_p = torch.where(pick[2] == 0, 0.0, torch.rand(rows, generator=g) * 0.5)
    return [x.to(device) for x in (vals, ids, ref_m, big_s, big_w, top_k, top_p, min_p)]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, **SETTINGS)
@given(kc=st.integers(1, 64), rows=st.integers(1, 300), seed=seeds)
def test_kept_set_op_matches_the_steps(device, kc, rows, seed):
    """filter_kept_set against the Python steps it runs (sampler_filters._kept_set_steps,
    without the passes): the same rows pending, and every other row's threshold and mass
    (to the rounding of exp and log, which torch and the op may take differently)."""
    g = torch.Generator().manual_seed(seed)
    vals, ids, ref_m, big_s, big_w, top_k, top_p, min_p = candidate_lists(g, rows, kc, device)
    opts = RowOptions(top_k, top_p, min_p, 0, None, kc)
    tau, s, w, pending = tse.filter_kept_set(vals, ids, ref_m, big_s, big_w, top_k, top_p,
                                             min_p)

    def no_pass(*_):
        raise AssertionError("the steps without passes never run one")

    want = _kept_set_steps(big_s, big_w, ref_m, vals, ids, opts, no_pass, passes=False)
    assert torch.equal(pending, want[3]), "pending rows"
    # tau is a candidate's value or ref_m + log(min_p), whose log may round differently
    # (by an ulp of the log, which the sum can cancel down to); a pending row's is the
    # threshold of the pass it asks for, NaN for the top-p search
    torch.testing.assert_close(tau, want[0], rtol=1e-6, atol=1e-6, equal_nan=True)
    done = ~pending
    torch.testing.assert_close(s[done], want[1][done], rtol=1e-6, atol=0)
    torch.testing.assert_close(w[done], want[2][done], rtol=1e-6, atol=1e-7)
    # a row's outputs are its own: the same row alone gives the same bits
    r = int(torch.randint(0, rows, (1,), generator=g))
    one = tse.filter_kept_set(*(x[r:r + 1] for x in (vals, ids, ref_m, big_s, big_w, top_k,
                                                      top_p, min_p)))
    for got, whole in zip(one, (tau, s, w, pending)):
        assert torch.equal(got[0], whole[r]) or bool(got[0].isnan() & whole[r].isnan())

    # the rows that asked for a pass, given its sums (made up: the candidates do not come
    # from logits here), settle as the steps do with the same sums; the others are
    # unchanged, the search rows still pending
    asks = pending & ~tau.isnan()
    given = torch.stack([big_s * (1 + torch.rand(rows, generator=g).to(device)),
                         -big_s * torch.rand(rows, generator=g).to(device)], 1)
    pass_mass = torch.where(asks[:, None], given, math.nan)
    again = tse.filter_kept_set(vals, ids, ref_m, big_s, big_w, top_k, top_p, min_p, pass_mass)

    def given_pass(r, thr, rm):
        return given[r][:, None, :].expand(-1, thr.shape[1], -1)

    settled = _kept_set_steps(big_s, big_w, ref_m, vals, ids, opts, given_pass, passes=True)
    assert torch.equal(again[3], pending & tau.isnan()), "only the search rows stay pending"
    done = ~again[3]
    torch.testing.assert_close(again[0][done], settled[0][done], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again[1][done], settled[1][done], rtol=1e-6, atol=0)
    torch.testing.assert_close(again[2][done], settled[2][done], rtol=1e-6, atol=1e-7)
    for got, first in zip(again, (tau, s, w, pending)):
        assert torch.equal(got[~pending], first[~pending])


@pytest.mark.gpu
@pytest.mark.sanitize
def test_kept_set_kernel_small():
    """The filter_kept_set kernel on a few rows of every width, for compute-sanitizer."""
    g = torch.Generator().manual_seed(4)
    for kc in (1, 37, 64):
        args = candidate_lists(g, 150, kc, "cuda")
        got = tse.filter_kept_set(*args)
        want = tse.filter_kept_set(*(x.cpu() for x in args))
        assert torch.equal(got[3].cpu(), want[3])
        for a, b in zip(got[:3], want[:3]):  # NaN: the tau of a row needing the search
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@settings(**SETTINGS)
@given(k=st.integers(1, 64), rows=st.integers(1, 3000), seed=seeds)
def test_candidate_sums_depend_on_the_row_alone(device, k, rows, seed):
    """The filters' sums over a row's candidates (row_sum, row_cumsum) are the row's own
    bits whatever the rows around it, and sums to float64 rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, k, generator=g).to(device)
    r = int(torch.randint(0, rows, (1,), generator=g))
    for f, exact in ((row_sum, lambda y: y.double().sum(-1)),
                     (row_cumsum, lambda y: y.double().cumsum(-1))):
        whole = f(x)
        assert torch.equal(f(x[r:r + 1])[0], whole[r])
        assert torch.equal(f(x.flip(0))[rows - 1 - r], whole[r])
        torch.testing.assert_close(whole.double(), exact(x), rtol=1e-5, atol=1e-6)


# ---- compile, opcheck, bad arguments ----

@pytest.mark.parametrize("device", DEVICES)
def test_ops_opcheck_and_compile_fullgraph(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 37, generator=g).to(device)
    targets = torch.randint(0, 37, (4,), generator=g).to(device)
    thr = torch.randn(4, 3, generator=g).to(device)
    ref_m = logits.max(1).values
    torch.library.opcheck(torch.ops.tokenspeed.logprob_topk_partials,
                          (logits, targets, 5, 0.9, 8, True))
    torch.library.opcheck(torch.ops.tokenspeed.logprob_mass_above, (logits, 1.1, thr, ref_m))
    lists = candidate_lists(g, 4, 8, device)
    torch.library.opcheck(torch.ops.tokenspeed.filter_kept_set, tuple(lists))
    torch.library.opcheck(torch.ops.tokenspeed.filter_kept_set,
                          (*lists, torch.rand(4, 2, generator=g).to(device)))

    def rich(logits, targets, thr, ref_m):
        return (*tse.logprob_topk_partials(logits, targets, 5, 0.9, 40),
                tse.logprob_mass_above(logits, 1.1, thr, ref_m), *tse.filter_kept_set(*lists))

    compiled = torch.compile(rich, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(logits, targets, thr, ref_m), rich(logits, targets, thr, ref_m)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_op_bad_arguments(device):
    lg = torch.randn(3, 10, device=device)
    tg = torch.tensor([1, 2, 3], device=device)
    m = lg.max(1).values
    assert_each_raises([
        (lambda: tse.logprob_topk_partials(lg, tg, 0, 1.0, 0), r"k must be in \[1, 64\], got 0"),
        (lambda: tse.logprob_topk_partials(lg, tg, 0, 1.0, 65), r"k must be in \[1, 64\], got 65"),
        (lambda: tse.logprob_topk_partials(lg, tg, 0, 1.0, -1), r"k must be in \[1, 64\], got -1"),
        (lambda: tse.logprob_topk_partials(lg, tg, 0, 0.0, 4), r"temperature must be finite"),
        (lambda: tse.logprob_mass_above(lg, 1.0, torch.zeros(2, 3, device=device), m),
         r"thresholds must be \[T, n\] with T = 3, got shape \[2, 3\]"),
        (lambda: tse.logprob_mass_above(lg, 1.0, torch.zeros(3, 2, device=device), m[:2]),
         r"ref_m must be \[T\] with T = 3"),
        (lambda: tse.logprob_mass_above(lg, 1.0, torch.zeros(3, 2, device=device,
                                                             dtype=torch.float64), m),
         r"thresholds and ref_m must be float32, got Double"),
    ])
    g = torch.Generator().manual_seed(0)
    args = candidate_lists(g, 3, 8, device)

    def kept(i, x):
        return lambda: tse.filter_kept_set(*args[:i], x, *args[i + 1:])

    assert_each_raises([
        (kept(0, torch.zeros(3, 65, device=device)),
         r"values must be \[T, k\] with k in \[1, 64\], got shape \[3, 65\]"),
        (kept(0, args[0].double()), r"values must be float32, got Double"),
        (kept(1, args[1][:, :4]), r"ids must be int64 of values' shape \[3, 8\]"),
        (kept(2, args[2][:2]), r"ref_m must be \[T\] with T = 3, got shape \[2\]"),
        (kept(5, args[5].float()), r"top_k must be int64, got Float"),
        (kept(6, args[6].double()), r"top_p must be float32, got Double"),
        (kept(7, torch.zeros(3, device="meta")), r"min_p"),
        (kept(8, torch.zeros(3, 3, device=device)),
         r"pass_mass must be \[T, 2\] with T = 3, got shape \[3, 3\]"),
        (kept(8, torch.zeros(3, 2, device=device, dtype=torch.float64)),
         r"pass_mass must be float32, got Double"),
    ])


# ---- the engine against HF fp32 logits filtered by the spec ----

pytest.importorskip("transformers")
VOCAB = 97


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from model_factory import load_hf, make_checkpoint
    path = make_checkpoint(tmp_path_factory.mktemp("rich"), "Qwen3ForCausalLM", vocab=VOCAB,
                           seed=21)
    return path, load_hf(path)


def hf_logits(model, seq):
    prompt, completion = list(seq["prompt_token_ids"]), list(seq["completion_token_ids"])
    with torch.no_grad():
        out = model(torch.tensor([prompt + completion])).logits[0]
    return out[len(prompt) - 1:-1], torch.tensor(completion)


def workload(seed: int, n: int = 5) -> list[dict]:
    from model_factory import random_sequences
    seqs = random_sequences(torch.Generator().manual_seed(seed), VOCAB, n, max_completion=9)
    seqs[0]["completion_token_ids"] = [1, 2, 3, 4]  # never empty in the first sequence
    return seqs


def check_against_hf(model, seqs, out, temperature, call, per_seq_ids=None):
    """The engine's outputs against HF fp32 logits run through the float64 spec; 1e-4 as
    in test_engine (the model's own fp32 error, not the head's)."""
    for i, seq in enumerate(seqs):
        logits, completion = hf_logits(model, seq)
        opts = {name: seq.get(name, call[name]) for name in ("top_k", "top_p", "min_p")}
        ids = seq.get("token_ids", per_seq_ids if per_seq_ids is not None else call["token_ids"])
        if ids is not None and (not ids or not isinstance(ids[0], list)):
            ids = [ids] * len(completion)
        want = ref.sampler_logprobs(logits, completion, temperature, opts["top_k"],
                                    opts["top_p"], opts["min_p"], call["top_logprobs"], ids)
        assert_scores(torch.tensor(out["log_probs"][i]), want["log_probs"], f"seq {i} lp", 1e-4)
        assert_scores(torch.tensor(out["entropy"][i]), want["entropy"], f"seq {i} entropy", 1e-4)
        if call["top_logprobs"]:
            top = out["top_logprobs"][i]
            assert torch.equal(torch.tensor(top["ids"], dtype=torch.int64).view(-1, call[
                "top_logprobs"]), want["top_ids"])
            assert_scores(torch.tensor(top["logprobs"]).view(-1, call["top_logprobs"]),
                          want["top_logprobs"], f"seq {i} top", 1e-4)
        if ids is not None:
            for j, row in enumerate(out["token_ids_logprobs"][i]):
                assert_scores(torch.tensor(row, dtype=torch.float64),
                              want["token_logprobs"][j], f"seq {i} ids {j}", 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lean", [None, 40])
@pytest.mark.parametrize("call", [
    dict(top_k=0, top_p=1.0, min_p=0.0, top_logprobs=5, token_ids=None),
    dict(top_k=20, top_p=0.9, min_p=0.0, top_logprobs=3, token_ids=[0, 5, 96]),
    dict(top_k=0, top_p=0.8, min_p=0.05, top_logprobs=0, token_ids=[]),
    dict(top_k=0, top_p=1.0, min_p=0.1, top_logprobs=64, token_ids=None),
])
def test_engine_matches_hf_filtered_by_spec(ckpt, device, lean, call):
    from tokenspeed import Engine
    path, model = ckpt
    seqs = workload(5)
    seqs[1]["top_k"] = 3           # per-sequence overrides
    seqs[2]["top_p"] = 0.5
    seqs[3]["token_ids"] = [[7]] * len(seqs[3]["completion_token_ids"])
    with Engine(path, device=device, dtype="float32", page_size=4, max_batch_tokens=16,
                lean_vocab_chunk=lean) as engine:
        out = engine.compute_log_probs(seqs, 0.7, return_entropy=True, **call)
        check_against_hf(model, seqs, out, 0.7, call)
        plain = engine.compute_log_probs(workload(5), 0.7, return_entropy=True)
        tensors = engine.compute_log_probs(seqs, 0.7, return_entropy=True, return_tensors=True,
                                           **call)
    # the plain call in the same engine is untouched by the earlier rich one
    for i, seq in enumerate(workload(5)):
        logits, completion = hf_logits(model, seq)
        want = ref.logprobs(logits, completion, 0.7)
        assert_scores(torch.tensor(plain["log_probs"][i]), want, "plain")
    n = len(seqs[0]["completion_token_ids"])
    assert_scores(tensors["log_probs"][0, :n], torch.tensor(out["log_probs"][0]), "tensors")
    if call["top_logprobs"]:
        assert tensors["top_logprobs"]["ids"].shape[2] == call["top_logprobs"]


def test_engine_rejects_bad_options_and_scores_nothing(ckpt):
    from tokenspeed import Engine
    path, _ = ckpt
    seqs = workload(6, 2)
    with Engine(path, device="cpu", dtype="float32") as engine:
        bad = [
            (dict(top_k=-1), ValueError, r"top_k must be in \[0, 64\], got -1"),
            (dict(top_k=65), ValueError, r"top_k must be in \[0, 64\], got 65"),
            (dict(top_k=1.5), TypeError, r"top_k must be an int"),
            (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\], got 0.0"),
            (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\], got 1.5"),
            (dict(min_p=1.0), ValueError, r"min_p must be in \[0, 1\), got 1.0"),
            (dict(min_p=-0.1), ValueError, r"min_p must be in \[0, 1\)"),
            (dict(min_p=math.nan), ValueError, r"min_p must be in \[0, 1\)"),
            (dict(top_logprobs=65), ValueError, r"top_logprobs must be in \[0, 64\], got 65"),
            (dict(token_ids=[3, VOCAB]), ValueError,
             rf"token_ids\[1\] is {VOCAB}, vocabulary is \[0, {VOCAB}\)"),
        ]
        for kwargs, error, match in bad:
            with pytest.raises(error, match=match):
                engine.compute_log_probs(seqs, **kwargs)
        per_seq = [
            ({"top_p": 2.0}, "top_p", r"sequence 1: top_p must be in \(0, 1\], got 2.0"),
            ({"top_k": 99}, "top_k", r"sequence 1: top_k must be in \[0, 64\], got 99"),
            ({"token_ids": [-1]}, "token_ids", r"sequence 1: token_ids\[0\] is -1"),
            ({"token_ids": [[1]] * 99}, "token_ids", r"sequence 1: token_ids has 99 lists"),
        ]
        for extra, field, match in per_seq:
            with pytest.raises(InvalidSequenceError, match=match) as e:
                engine.compute_log_probs([seqs[0], {**seqs[1], **extra}])
            assert e.value.index == 1 and e.value.field == field
        assert engine.stats()["scored_tokens"] == 0
        assert engine.stats()["running"] == engine.stats()["waiting"] == 0


@pytest.mark.parametrize("mode", ["partials", "gather"])
def test_tensor_parallel_matches_one_rank(ckpt, mode):
    """tp=2 over gloo (spawned workers) gives what tp=1 gives, up to fp32 rounding."""
    from tokenspeed import Engine
    path, _ = ckpt
    seqs = workload(7, 4)
    seqs[1]["top_k"] = 0
    call = dict(top_k=10, top_p=0.85, min_p=0.02, top_logprobs=6, token_ids=[1, 50, 96],
                return_entropy=True)
    kw = dict(device="cpu", dtype="float32", page_size=4, max_batch_tokens=16)
    with Engine(path, **kw) as engine:
        want = engine.compute_log_probs(seqs, 0.9, **call)
    with Engine(path, tp_size=2, logprob_mode=mode, **kw) as engine:
        got = engine.compute_log_probs(seqs, 0.9, **call)
    for i in range(len(seqs)):
        assert_scores(torch.tensor(got["log_probs"][i]), torch.tensor(want["log_probs"][i]), "lp")
        assert_scores(torch.tensor(got["entropy"][i]), torch.tensor(want["entropy"][i]), "ent")
        assert got["top_logprobs"][i]["ids"] == want["top_logprobs"][i]["ids"]
        for a, b in zip(got["token_ids_logprobs"][i], want["token_ids_logprobs"][i]):
            assert_scores(torch.tensor(a), torch.tensor(b), "ids")


def test_cli_rich_flags(ckpt, tmp_path):
    """--top-k/--top-p/--min-p/--top-logprobs reach the engine; a line's own token_ids and
    filters are honoured; a bad flag fails before anything is written."""
    import json

    from test_cli import run_cli, write_lines
    path, model = ckpt
    seqs = workload(8, 2)
    seqs[1] = {**seqs[1], "token_ids": [0, 5], "top_p": 0.6}
    src = write_lines(tmp_path / "in.jsonl", seqs)
    out = tmp_path / "out.jsonl"
    flags = ["--model", str(path), "--device", "cpu", "--dtype", "float32", "-o", str(out),
             "--temperature", "0.8", "--entropy"]
    proc = run_cli(["score", str(src), *flags, "--top-k", "7", "--top-p", "0.9",
                    "--min-p", "0.01", "--top-logprobs", "4"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    # a token the filters cut scores -inf, written as null
    lines = [json.loads(line.replace("null", "-Infinity"))
             for line in out.read_text().splitlines()]
    result = {key: [line.get(key) for line in lines]
              for key in ("log_probs", "entropy", "top_logprobs")}
    result["token_ids_logprobs"] = [line.get("token_ids_logprobs", []) for line in lines]
    call = dict(top_k=7, top_p=0.9, min_p=0.01, top_logprobs=4, token_ids=None)
    check_against_hf(model, seqs[:1], result, 0.8, call)
    # a line that asks no ids gets an empty list per position
    assert lines[0]["token_ids_logprobs"] == [[]] * len(seqs[0]["completion_token_ids"])
    assert len(lines[1]["token_ids_logprobs"][0]) == 2
    check_against_hf(model, seqs[1:], {k: v[1:] for k, v in result.items()}, 0.8, call)
    bad = run_cli(["score", str(src), *flags, "--top-p", "0"], tmp_path)
    assert bad.returncode == 1 and "top_p must be in (0, 1], got 0.0" in bad.stderr


def test_rich_outputs_copied_out_mid_call(ckpt, monkeypatch):
    """A call whose rich outputs are copied to the host several times (a small pending
    bound) gives what one copy gives."""
    from tokenspeed import Engine
    import tokenspeed.shard as shard_module
    path, _ = ckpt
    seqs = workload(9, 6)
    call = dict(top_k=5, top_logprobs=5, token_ids=[3, 4], return_entropy=True)
    kw = dict(device="cpu", dtype="float32", page_size=4, max_batch_tokens=16)
    with Engine(path, **kw) as engine:
        # the first call fills the prefix cache, so the two compared calls compute alike
        engine.compute_log_probs(seqs, 0.9, **call)
        want = engine.compute_log_probs(seqs, 0.9, **call)
        monkeypatch.setattr(shard_module, "MAX_PENDING_ROWS", 40)  # about 4 rich rows
        got = engine.compute_log_probs(seqs, 0.9, **call)
    assert got == want
