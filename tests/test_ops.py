"""Every op against tokenspeed_ext.reference on fresh random inputs (hypothesis), plus
opcheck, torch.compile and argument checks. Runs on CPU, and on CUDA when present.

Tolerances are derived: a kernel's error against the float64 reference must stay within
a small multiple of PyTorch's own error on the same input (the reference evaluated in
fp32 for log-probs, in the input dtype for attention), plus a tiny absolute floor.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenspeed_ext as tse
from tokenspeed_ext import reference as ref

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.differing_executors])
seeds = st.integers(0, 2**31 - 1)


def assert_within_own_error(actual, exact, own, *, factor=4.0, floor=1e-6, what=""):
    """|actual - exact| <= factor * max|own - exact| + floor * (1 + max|exact|).

    Non-finite entries of `exact` (-inf log-probs, nan rows) must be reproduced exactly.
    """
    actual, own = actual.double().cpu(), own.double().cpu()
    exact = exact.double().cpu()
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(actual), torch.isnan(exact)), f"{what}: nan pattern differs"
    assert torch.equal(actual[~finite & ~torch.isnan(exact)],
                       exact[~finite & ~torch.isnan(exact)]), f"{what}: infinities differ"
    if not finite.any():
        return
    err = (actual[finite] - exact[finite]).abs().max().item()
    own_err = (own[finite] - exact[finite]).abs().max().item()
    bound = factor * own_err + floor * (1.0 + exact[finite].abs().max().item())
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (PyTorch's own {own_err:.3g})"


def make_logits(g, t, v, dtype, device, scale, pad, neginf_frac):
    """[t, v] logits, a [:, :v] view of a padded buffer when pad > 0; every row keeps
    at least one finite logit."""
    x = torch.randn(t, v + pad, generator=g, dtype=torch.float64) * scale
    x = x.clamp(-6e4, 6e4)  # stays finite in fp16
    if neginf_frac > 0:
        mask = torch.rand(t, v + pad, generator=g) < neginf_frac
        mask[torch.arange(t), torch.randint(0, v, (t,), generator=g)] = False
        x[mask] = -math.inf
    return x.to(dtype).to(device)[:, :v]


logit_cases = st.fixed_dictionaries(dict(
    seed=seeds,
    dtype=st.sampled_from(FLOATS),
    target_dtype=st.sampled_from([torch.int32, torch.int64]),
    temperature=st.one_of(st.just(1.0), st.floats(0.2, 5.0)),
    scale=st.sampled_from([1.0, 8.0, 1e4]),
    pad=st.sampled_from([0, 3, 64]),
    neginf_frac=st.sampled_from([0.0, 0.0, 0.3]),
    neginf_target=st.booleans(),
))


def check_logprobs(case, t, v, device):
    g = torch.Generator().manual_seed(case["seed"])
    logits = make_logits(g, t, v, case["dtype"], device, case["scale"], case["pad"],
                         case["neginf_frac"])
    targets = torch.randint(0, v, (t,), generator=g)
    if case["neginf_target"] and v > 1:
        # the max stays finite, so the row is valid but its target is impossible
        row_max = logits.float().cpu().argmax(-1)
        targets = torch.where(row_max == 0, torch.ones_like(targets), torch.zeros_like(targets))
        logits = logits.clone()
        logits[torch.arange(t), targets.to(device)] = -math.inf
    targets = targets.to(case["target_dtype"]).to(device)
    lp, ent = tse.logprobs(logits, targets, case["temperature"], return_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (t,)
    exact = ref.logprobs(logits, targets, case["temperature"], return_entropy=True)
    own = ref.logprobs(logits, targets, case["temperature"], return_entropy=True,
                       dtype=torch.float32)
    assert_within_own_error(lp, exact[0], own[0], what="logprob")
    assert_within_own_error(ent, exact[1], own[1], what="entropy")
    assert torch.equal(tse.logprobs(logits, targets, case["temperature"]), lp)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=120, **SETTINGS)
@given(case=logit_cases, t=st.integers(1, 9),
       v=st.one_of(st.sampled_from([1, 2, 7, 8, 17, 512, 513]), st.integers(1, 3000)))
def test_logprobs_matches_reference(device, case, t, v):
    check_logprobs(case, t, v, device)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=8, **SETTINGS)
@given(case=logit_cases, t=st.integers(1, 3), v=st.sampled_from([151936, 151937]))
def test_logprobs_real_vocabulary(device, case, t, v):
    check_logprobs(case, t, v, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_logprobs_special_rows(device, dtype):
    logits = torch.tensor([[-math.inf, -math.inf, -math.inf],   # no finite logit: nan
                           [0.5, -math.inf, 2.0],               # -inf target: -inf
                           [3.0, -math.inf, -math.inf]],        # one finite logit: lp 0
                          dtype=dtype, device=device)
    targets = torch.tensor([0, 1, 0], device=device)
    lp, ent = tse.logprobs(logits, targets, 0.7, return_entropy=True)
    assert math.isnan(lp[0]) and math.isnan(ent[0])
    assert lp[1].item() == -math.inf and math.isfinite(ent[1].item())
    assert lp[2].item() == 0.0 and ent[2].item() == 0.0
    comb = tse.combine_logprob_partials(tse.logprob_partials(logits, targets, 0, 0.7)[None])
    torch.testing.assert_close(comb, (lp, ent), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_without_entropy_returns_empty(device):
    logits = torch.randn(5, 11, device=device)
    targets = torch.randint(0, 11, (5,), device=device)
    lp, ent = torch.ops.tokenspeed.logprobs(logits, targets, 1.0, False)
    assert lp.shape == (5,) and ent.shape == (0,) and ent.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=80, **SETTINGS)
@given(case=logit_cases, t=st.integers(1, 6), v=st.integers(2, 2500),
       cuts=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=5), data=st.data())
def test_partials_over_vocabulary_splits(device, case, t, v, cuts, data):
    g = torch.Generator().manual_seed(case["seed"])
    logits = make_logits(g, t, v, case["dtype"], device, case["scale"], case["pad"],
                         case["neginf_frac"])
    targets = torch.randint(0, v, (t,), generator=g).to(case["target_dtype"]).to(device)
    temp = case["temperature"]
    bounds = sorted({0, v, *(int(c * v) for c in cuts)})
    shards = list(zip(bounds[:-1], bounds[1:]))
    parts = torch.stack([tse.logprob_partials(logits[:, a:b], targets, a, temp)
                         for a, b in shards])
    for (a, b), p in zip(shards, parts):
        exact = ref.logprob_partials(logits[:, a:b], targets, a, temp)
        outside = ((targets < a) | (targets >= b)).cpu()
        assert (p[:, 3].cpu()[outside] == -math.inf).all()
        torch.testing.assert_close(p.double().cpu(), exact.cpu(), rtol=2e-5, atol=1e-5,
                                   equal_nan=True)
    lp, ent = tse.combine_logprob_partials(parts)
    # merging is in a fixed order, so it is deterministic
    torch.testing.assert_close(tse.combine_logprob_partials(parts.clone()), (lp, ent),
                               rtol=0, atol=0)
    exact = ref.logprobs(logits, targets, temp, return_entropy=True)
    own = ref.logprobs(logits, targets, temp, return_entropy=True, dtype=torch.float32)
    assert_within_own_error(lp, exact[0], own[0], what="combined logprob")
    assert_within_own_error(ent, exact[1], own[1], what="combined entropy")
    # the combine op on its own, against the reference merge of the same partials
    exact_c = ref.combine_logprob_partials(parts)
    own_c = ref.combine_logprob_partials(parts, dtype=torch.float32)
    assert_within_own_error(lp, exact_c[0], own_c[0], what="combine")
    assert_within_own_error(ent, exact_c[1], own_c[1], what="combine entropy")
    # one shard is exactly the single-device op
    single = tse.combine_logprob_partials(tse.logprob_partials(logits, targets, 0, temp)[None])
    expect = tse.logprobs(logits, targets, temp, return_entropy=True)
    torch.testing.assert_close(single, expect, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_partials_take_targets_beyond_the_shard(device):
    logits = torch.randn(3, 10, device=device)
    targets = torch.tensor([0, 25, 1000], device=device)
    p = tse.logprob_partials(logits, targets, 20, 1.0)
    assert p[0, 3].item() == -math.inf and p[2, 3].item() == -math.inf
    assert p[1, 3].item() == logits[1, 5].item()


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=50, **SETTINGS)
@given(seed=seeds, dtype=st.sampled_from(FLOATS),
       slot_dtype=st.sampled_from([torch.int32, torch.int64]),
       pages=st.integers(1, 12), page_size=st.sampled_from([1, 3, 16]),
       hk=st.integers(1, 4), d=st.sampled_from([1, 7, 64, 128]),
       fill=st.floats(0.0, 1.0), skip_frac=st.sampled_from([0.0, 0.3]))
def test_store_kv_matches_reference(device, seed, dtype, slot_dtype, pages, page_size, hk, d,
                                    fill, skip_frac):
    g = torch.Generator().manual_seed(seed)
    slots_total = pages * page_size
    n = int(fill * slots_total)
    k, v = (torch.randn(n, hk, d, generator=g).to(dtype).to(device) for _ in range(2))
    k_cache, v_cache = (torch.randn(pages, page_size, hk, d, generator=g).to(dtype).to(device)
                        for _ in range(2))
    slots = torch.randperm(slots_total, generator=g)[:n]
    skip = torch.rand(n, generator=g) < skip_frac
    slots = torch.where(skip, -1 - torch.randint(0, 5, (n,), generator=g), slots)
    slots = slots.to(slot_dtype).to(device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_fast, v_fast = k_cache.clone(), v_cache.clone()
    ref.store_kv(k, v, k_ref, v_ref, slots)
    tse.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    # skipping the data-dependent check changes nothing for valid slots
    tse.store_kv(k, v, k_fast, v_fast, slots, validate=False)
    assert torch.equal(k_fast, k_ref) and torch.equal(v_fast, v_ref)


def make_paged_batch(g, device, dtype, n_new, prefix, page_size, hk, ratio, d):
    """A ragged batch over shuffled pages; unused page-table entries hold garbage."""
    kv_lens = [a + b for a, b in zip(n_new, prefix)]
    need = [(n + page_size - 1) // page_size for n in kv_lens]
    total = sum(need) + 3
    perm = torch.randperm(total, generator=g)
    width = max(need + [1]) + 1
    table = torch.randint(-5, 1000, (len(n_new), width), generator=g, dtype=torch.int32)
    used = 0
    for b, k in enumerate(need):
        table[b, :k] = perm[used:used + k].to(torch.int32)
        used += k
    k_cache, v_cache = (torch.randn(total, page_size, hk, d, generator=g).to(dtype)
                        for _ in range(2))
    q = torch.randn(sum(n_new), hk * ratio, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(n_new).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    return [x.to(device) for x in (q, k_cache, v_cache, table, cu, lens)]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=80, **SETTINGS)
@given(seed=seeds, dtype=st.sampled_from(FLOATS),
       reqs=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 50)), min_size=1, max_size=4),
       page_size=st.one_of(st.sampled_from([1, 16]), st.integers(1, 24)),
       hk=st.integers(1, 2), ratio=st.sampled_from([1, 4, 7]),
       d=st.one_of(st.sampled_from([64, 128]), st.integers(1, 80)),
       scale=st.one_of(st.none(), st.floats(0.05, 1.0)))
def test_paged_attention_matches_dense_reference(device, seed, dtype, reqs, page_size, hk,
                                                 ratio, d, scale):
    g = torch.Generator().manual_seed(seed)
    args = make_paged_batch(g, device, dtype, [r[0] for r in reqs], [r[1] for r in reqs],
                            page_size, hk, ratio, d)
    out = tse.paged_prefill_attention(*args, scale=scale)
    assert out.dtype == dtype and out.shape == args[0].shape
    exact = ref.paged_prefill_attention(*args, scale=scale)
    own = ref.paged_prefill_attention(*args, scale=scale, dtype=dtype)
    assert_within_own_error(out, exact, own, factor=2.0, floor=1e-6, what="attention")
    # the per-layer fast path (grid from max_seqlen_q, no metadata round trip) is the same
    fast = tse.paged_prefill_attention(*args, scale=scale, validate=False,
                                       max_seqlen_q=max(r[0] for r in reqs))
    assert torch.equal(fast, out)


def small_cases(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 37, generator=g).to(device)
    targets = torch.randint(0, 37, (4,), generator=g).to(device)
    parts = torch.stack([tse.logprob_partials(logits[:, :20], targets, 0, 1.3),
                         tse.logprob_partials(logits[:, 20:], targets, 20, 1.3)])
    k, v = (torch.randn(5, 2, 8, generator=g).to(device) for _ in range(2))
    caches = [torch.randn(4, 3, 2, 8, generator=g).to(device) for _ in range(2)]
    slots = torch.tensor([4, -1, 0, 11, 7], device=device)
    paged = make_paged_batch(g, device, torch.float32, [3, 0, 2], [2, 4, 0], 3, 2, 2, 8)
    return {
        "logprobs": (torch.ops.tokenspeed.logprobs, (logits, targets, 0.9, True)),
        "logprobs_no_entropy": (torch.ops.tokenspeed.logprobs, (logits, targets, 1.0, False)),
        "logprob_partials": (torch.ops.tokenspeed.logprob_partials, (logits, targets, 3, 1.1)),
        "combine_logprob_partials": (torch.ops.tokenspeed.combine_logprob_partials, (parts,)),
        "store_kv": (torch.ops.tokenspeed.store_kv, (k, v, *caches, slots)),
        "paged_prefill_attention": (torch.ops.tokenspeed.paged_prefill_attention,
                                    (*paged, None)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["logprobs", "logprobs_no_entropy", "logprob_partials",
                                  "combine_logprob_partials", "store_kv",
                                  "paged_prefill_attention"])
def test_opcheck(device, name):
    op, args = small_cases(device)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_wrappers_compile_fullgraph(device):
    cases = small_cases(device)
    logits, targets = cases["logprobs"][1][:2]
    parts = cases["combine_logprob_partials"][1][0]
    paged = cases["paged_prefill_attention"][1][:6]
    k, v, kc, vc, slots = cases["store_kv"][1]

    def score(logits, targets, parts, *paged):
        lp, ent = tse.logprobs(logits, targets, 0.8, return_entropy=True)
        return (lp, ent, tse.logprobs(logits, targets),
                tse.logprob_partials(logits, targets, 5, 1.2),
                *tse.combine_logprob_partials(parts),
                tse.paged_prefill_attention(*paged),
                tse.paged_prefill_attention(*paged, scale=0.3))

    def store(k, v, kc, vc, slots):
        tse.store_kv(k, v, kc, vc, slots)
        return kc.sum() + vc.sum()

    compiled = torch.compile(score, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(logits, targets, parts, *paged),
                         score(logits, targets, parts, *paged)):
        assert torch.equal(got, want)
    kc2, vc2 = kc.clone(), vc.clone()
    torch.compile(store, fullgraph=True, backend="aot_eager")(k, v, kc, vc, slots)
    store(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def bad_calls(device):
    """(call, regex naming the argument and value) for every argument check."""
    lg = torch.randn(3, 10, device=device)
    tg = torch.tensor([1, 2, 3], device=device)
    k = torch.randn(2, 2, 4, device=device)
    kc = torch.randn(3, 4, 2, 4, device=device)
    slots = torch.tensor([0, 5], device=device)
    paged = make_paged_batch(torch.Generator().manual_seed(1), device, torch.float32,
                             [2, 3], [1, 0], 2, 2, 2, 4)
    q, k_cache, v_cache, table, cu, lens = paged

    def attn(**changes):
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, page_table=table,
                    cu_seqlens_q=cu, kv_lens=lens)
        args.update(changes)
        return lambda: tse.paged_prefill_attention(**args)

    bad_table = table.clone()
    bad_table[1, 0] = k_cache.shape[0]
    calls = [
        (lambda: tse.logprobs(lg.long(), tg), r"logits must be float32"),
        (lambda: tse.logprobs(lg[0], tg), r"logits must be 2-D"),
        (lambda: tse.logprobs(lg, tg.float()), r"targets must be int32 or int64, got Float"),
        (lambda: tse.logprobs(lg, tg[:2]), r"targets has 2 entries but logits has 3 rows"),
        (lambda: tse.logprobs(lg, tg + 8), r"targets\[2\] is 11, outside the vocabulary"),
        (lambda: tse.logprobs(lg, tg - 2), r"targets\[0\] is -1, below 0"),
        (lambda: tse.logprobs(lg[:, ::2], tg), r"logits must be contiguous along the vocab"),
        (lambda: tse.logprobs(lg, tg, 0.0), r"temperature must be finite and > 0, got 0"),
        (lambda: tse.logprobs(lg, tg, -1.0), r"temperature must be finite and > 0, got -1"),
        (lambda: tse.logprobs(lg, tg, math.nan), r"temperature must be finite and > 0, got nan"),
        (lambda: tse.logprobs(lg, tg, math.inf), r"temperature must be finite and > 0, got inf"),
        (lambda: tse.logprob_partials(lg, tg, -1), r"vocab_start must be >= 0, got -1"),
        (lambda: tse.logprob_partials(lg, tg - 2, 0), r"targets\[0\] is -1, below 0"),
        (lambda: tse.logprob_partials(lg, tg, 0, math.nan), r"temperature must be finite"),
        (lambda: tse.combine_logprob_partials(torch.zeros(2, 3, 4, dtype=torch.float64,
                                                          device=device)),
         r"partials must be float32, got Double"),
        (lambda: tse.combine_logprob_partials(torch.ones(2, 3, 3, device=device)),
         r"partials must be \[S, T, 4\], got shape \[2, 3, 3\]"),
        (lambda: tse.combine_logprob_partials(torch.ones(0, 3, 4, device=device)),
         r"partials needs at least one shard"),
        (lambda: tse.store_kv(k, k.half(), kc, kc.clone(), slots), r"v has dtype Half"),
        (lambda: tse.store_kv(k.int(), k.int(), kc, kc.clone(), slots), r"k must be float32"),
        (lambda: tse.store_kv(k[0], k[0], kc, kc.clone(), slots), r"k must be \[N, Hk, D\]"),
        (lambda: tse.store_kv(k, k, kc.half(), kc.half(), slots), r"k_cache/v_cache dtypes"),
        (lambda: tse.store_kv(k, k, kc[:, :, :1], kc[:, :, :1].clone(), slots),
         r"k_cache heads/dim"),
        (lambda: tse.store_kv(k, k, kc.transpose(0, 1), kc.transpose(0, 1), slots),
         r"k_cache and v_cache must be contiguous"),
        (lambda: tse.store_kv(k, k, kc, kc.clone(), slots.float()),
         r"slot_mapping must be int32 or int64"),
        (lambda: tse.store_kv(k, k, kc, kc.clone(), slots[:1]),
         r"slot_mapping must be \[N\] with N = 2"),
        (lambda: tse.store_kv(k, k, kc, kc.clone(), slots + 10),
         r"slot_mapping\[1\] is 15, but the cache has 12 slots"),
        (attn(q=q.long()), r"q must be float32"),
        (attn(q=q[:, :3]), r"query heads \(3\) must be a multiple of kv heads \(2\)"),
        (attn(q=q[..., :3]), r"head dim of q \(3\) and k_cache \(4\) differ"),
        (attn(k_cache=k_cache.half(), v_cache=v_cache.half()), r"k_cache/v_cache dtypes"),
        (attn(page_table=table.long()), r"page_table must be int32, got Long"),
        (attn(page_table=table[:, :1]), r"kv_lens\[0\] is 3 but page_table has room for 2"),
        (attn(page_table=bad_table), r"page_table\[1, 0\] is \d+, outside \[0, \d+\)"),
        (attn(cu_seqlens_q=cu.long()), r"cu_seqlens_q must be int32, got Long"),
        (attn(cu_seqlens_q=cu[:2]), r"cu_seqlens_q must be \[B\+1\] with B = 2"),
        (attn(cu_seqlens_q=cu + 1), r"cu_seqlens_q\[0\] must be 0, got 1"),
        (attn(cu_seqlens_q=torch.tensor([0, 3, 2], dtype=torch.int32, device=device)),
         r"cu_seqlens_q\[2\] is 2 but q has 5 tokens"),
        (attn(cu_seqlens_q=torch.tensor([0, 6, 5], dtype=torch.int32, device=device),
              kv_lens=torch.tensor([6, 6], dtype=torch.int32, device=device)),
         r"cu_seqlens_q must be non-decreasing"),
        (attn(kv_lens=lens - 1), r"kv_lens\[0\] is 2 but request 0 has 2 new tokens|"
                                 r"kv_lens\[1\] is 2 but request 1 has 3 new tokens"),
        (attn(kv_lens=lens.long()), r"kv_lens must be int32, got Long"),
        (attn(max_seqlen_q=2), r"max_seqlen_q is 2 but request 1 has 3 new tokens"),
        (attn(max_seqlen_q=-1), r"max_seqlen_q must be >= 0, got -1"),
        (lambda: tse.paged_prefill_attention(*paged, scale=math.nan), r"scale must be finite"),
    ]
    if device != "cpu":
        calls += [
            (lambda: tse.logprobs(lg, tg.cpu()), r"logits is on cuda.* but targets is on cpu"),
            (lambda: tse.store_kv(k, k, kc, kc.clone(), slots.cpu()), r"slot_mapping"),
        ]
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_naming_the_argument(device):
    calls = bad_calls(device)
    for call, pattern in calls:
        with pytest.raises(RuntimeError, match=pattern):
            call()
    # a rejected call leaves the ops usable
    lg = torch.randn(2, 5, device=device)
    assert torch.isfinite(tse.logprobs(lg, torch.tensor([0, 4], device=device))).all()


@pytest.mark.parametrize("device", DEVICES)
def test_validate_false_skips_only_the_target_range_check(device):
    g = torch.Generator().manual_seed(7)
    lg = torch.randn(6, 37, generator=g).to(device)
    tg = torch.randint(0, 37, (6,), generator=g).to(device)
    want_lp, want_ent = tse.logprobs(lg, tg, 0.7, return_entropy=True)
    got_lp, got_ent = tse.logprobs(lg, tg, 0.7, return_entropy=True, validate=False)
    assert torch.equal(got_lp, want_lp) and torch.equal(got_ent, want_ent)
    assert torch.equal(tse.logprob_partials(lg, tg, 5, validate=False),
                       tse.logprob_partials(lg, tg, 5))
    # an out-of-range target is never read: it scores -inf, its neighbours are unchanged
    bad = tg.clone()
    bad[2], bad[4] = 37, -3
    lp = tse.logprobs(lg, bad, 0.7, validate=False)
    assert lp[2] == -math.inf and lp[4] == -math.inf
    keep = torch.tensor([0, 1, 3, 5], device=device)
    assert torch.equal(lp[keep], want_lp[keep])
    # the other checks still run
    with pytest.raises(RuntimeError, match=r"temperature must be finite"):
        tse.logprobs(lg, tg, 0.0, validate=False)
