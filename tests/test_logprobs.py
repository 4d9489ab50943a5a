"""The log-prob family (logprobs, logprob_partials, combine_logprob_partials) against
tokenspeed_ext.reference on fresh random inputs (hypothesis), on CPU and on CUDA when
present; CUDA-only checks at real vocabularies, on strided and empty rows, and that a
row's result does not depend on the rest of the batch (bitwise); opcheck, torch.compile
and argument checks.

A log-prob's error against the float64 reference must stay within a small multiple of
PyTorch's own error on the same input (the reference evaluated in fp32).
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from op_testing import (DEV, FLOATS, SETTINGS, assert_each_raises, assert_within_own_error,
                        sanitized_dtypes, seeds)

import tokenspeed_ext as tse
import tokenspeed_ext.ops  # noqa: F401 - registers torch.ops.tokenspeed.*
from tokenspeed_ext import reference as ref


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
    # x = logits / T is rounded to fp32 before exp(x - m): each term's relative error is
    # up to |x| * 2^-24, the bound of any fp32 evaluation (large logits make it matter)
    finite = logits.float().abs()[logits.float().isfinite()]
    rtol = max(2e-5, 8 * 2**-24 * (finite.max().item() / temp if finite.numel() else 0.0))
    for (a, b), p in zip(shards, parts):
        exact = ref.logprob_partials(logits[:, a:b], targets, a, temp)
        outside = ((targets < a) | (targets >= b)).cpu()
        assert (p[:, 3].cpu()[outside] == -math.inf).all()
        torch.testing.assert_close(p.double().cpu(), exact.cpu(), rtol=rtol, atol=1e-5,
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


# ---- CUDA only ----

def _logits(t: int, v: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(t, v, generator=gen, device=DEV) * 4).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sanitized_dtypes(torch.float32, torch.bfloat16,
                                                   torch.float16))
@pytest.mark.parametrize("t,v", [(1, 1), (3, 7), (5, 8193), (2, 32769), (17, 32000),
                                 (4, 151936)])
def test_logprobs_small(dtype, t, v):
    gen = torch.Generator(DEV).manual_seed(t * 1000 + v)
    x = _logits(t, v, dtype, gen)
    tgt = torch.randint(0, v, (t,), device=DEV, generator=gen)
    for temp in (1.0, 0.7):
        lp, ent = tse.logprobs(x, tgt, temperature=temp, return_entropy=True)
        rlp, rent = ref.logprobs(x, tgt, temp, return_entropy=True)
        torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.sanitize
def test_logprobs_strided_inf_and_empty_rows_small():
    gen = torch.Generator(DEV).manual_seed(1)
    wide = _logits(6, 1003, torch.bfloat16, gen)
    x = wide[:, 1:1000]  # unaligned rows, row stride 1003
    x[1, ::3] = -math.inf
    x[2] = -math.inf
    tgt = torch.tensor([0, 3, 2, 998, 500, 7], device=DEV)
    lp, ent = tse.logprobs(x, tgt, return_entropy=True)
    rlp, rent = ref.logprobs(x, tgt, return_entropy=True)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    assert lp[1] == -math.inf
    keep = torch.tensor([0, 3, 4, 5], device=DEV)
    torch.testing.assert_close(lp[keep].double(), rlp[keep], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent[[0, 1, 3, 4, 5]].double(), rent[[0, 1, 3, 4, 5]],
                               rtol=1e-5, atol=2e-5)
    # a row's result does not depend on its alignment or its neighbours
    for r in range(6):
        one = tse.logprobs(x[r:r + 1].contiguous(), tgt[r:r + 1], return_entropy=True)
        torch.testing.assert_close(one[0], lp[r:r + 1], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(one[1], ent[r:r + 1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("v", [32000, 151936])
def test_logprobs_batch_independent(v):
    gen = torch.Generator(DEV).manual_seed(v)
    x = _logits(700, v, torch.bfloat16, gen)
    tgt = torch.randint(0, v, (700,), device=DEV, generator=gen)
    lp, ent = tse.logprobs(x, tgt, return_entropy=True)
    for lo, hi in [(0, 1), (5, 6), (3, 300), (699, 700)]:
        lp2, ent2 = tse.logprobs(x[lo:hi], tgt[lo:hi], return_entropy=True)
        assert torch.equal(lp2, lp[lo:hi]) and torch.equal(ent2, ent[lo:hi])


@pytest.mark.gpu
@pytest.mark.sanitize
@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_partials_and_combine_small(shards):
    gen = torch.Generator(DEV).manual_seed(shards)
    t, v = 9, 20011
    x = _logits(t, v, torch.bfloat16, gen)
    tgt = torch.randint(0, v, (t,), device=DEV, generator=gen)
    bounds = [round(i * v / shards) for i in range(shards + 1)]
    parts = []
    for i in range(shards):
        p = tse.logprob_partials(x[:, bounds[i]:bounds[i + 1]], tgt, bounds[i], 0.9)
        rp = ref.logprob_partials(x[:, bounds[i]:bounds[i + 1]], tgt, bounds[i], 0.9)
        torch.testing.assert_close(p.double(), rp, rtol=1e-5, atol=1e-5)
        parts.append(p)
    lp, ent = tse.combine_logprob_partials(torch.stack(parts))
    rlp, rent = ref.logprobs(x, tgt, 0.9, return_entropy=True)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)


# ---- opcheck, compile, bad arguments ----

def small_cases(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 37, generator=g).to(device)
    targets = torch.randint(0, 37, (4,), generator=g).to(device)
    parts = torch.stack([tse.logprob_partials(logits[:, :20], targets, 0, 1.3),
                         tse.logprob_partials(logits[:, 20:], targets, 20, 1.3)])
    return {
        "logprobs": (torch.ops.tokenspeed.logprobs, (logits, targets, 0.9, True)),
        "logprobs_no_entropy": (torch.ops.tokenspeed.logprobs, (logits, targets, 1.0, False)),
        "logprob_partials": (torch.ops.tokenspeed.logprob_partials, (logits, targets, 3, 1.1)),
        "combine_logprob_partials": (torch.ops.tokenspeed.combine_logprob_partials, (parts,)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["logprobs", "logprobs_no_entropy", "logprob_partials",
                                  "combine_logprob_partials"])
def test_opcheck(device, name):
    op, args = small_cases(device)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_wrappers_compile_fullgraph(device):
    cases = small_cases(device)
    logits, targets = cases["logprobs"][1][:2]
    parts = cases["combine_logprob_partials"][1][0]

    def score(logits, targets, parts):
        lp, ent = tse.logprobs(logits, targets, 0.8, return_entropy=True)
        return (lp, ent, tse.logprobs(logits, targets),
                tse.logprob_partials(logits, targets, 5, 1.2),
                *tse.combine_logprob_partials(parts))

    compiled = torch.compile(score, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(logits, targets, parts), score(logits, targets, parts)):
        assert torch.equal(got, want)


def bad_calls(device):
    """(call, regex naming the argument and value) for every argument check."""
    lg = torch.randn(3, 10, device=device)
    tg = torch.tensor([1, 2, 3], device=device)
    calls = [
        (lambda: tse.logprobs(lg.long(), tg), r"logits must be float32"),
        (lambda: tse.logprobs(lg[0], tg), r"logits must be 2-D"),
        (lambda: tse.logprobs(lg, tg.float()), r"targets must be int32 or int64, got Float"),
        (lambda: tse.logprobs(lg, tg[:2]), r"targets has 2 entries but logits has 3 rows"),
        (lambda: tse.logprobs(lg, tg + 8), r"targets\[2\] is 11, outside the vocabulary"),
        (lambda: tse.logprobs(lg, tg - 2), r"targets\[0\] is -1, below 0"),
        (lambda: tse.logprobs(lg[:, ::2], tg), r"logits must be contiguous along the vocab"),
        (lambda: tse.logprobs(lg, tg, 0.0), r"temperature must be finite and >= 1e-06, got 0"),
        (lambda: tse.logprobs(lg, tg, -1.0), r"temperature must be finite and >= 1e-06, got -1"),
        (lambda: tse.logprobs(lg, tg, 1e-39), r"temperature must be finite and >= 1e-06, got"),
        (lambda: tse.logprobs(lg, tg, math.nan), r"temperature must be finite and >= 1e-06, "
                                                 r"got nan"),
        (lambda: tse.logprobs(lg, tg, math.inf), r"temperature must be finite and >= 1e-06, "
                                                 r"got inf"),
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
    ]
    if device == "cpu":
        logits, targets = torch.randn(3, 11), torch.randint(0, 11, (3,))
        calls += [
            (lambda: tse.logprobs(logits, targets.to("meta")), "targets is on meta"),
            (lambda: tse.logprob_partials(logits.to("meta"), targets, 0), "targets is on cpu"),
        ]
    else:
        calls += [
            (lambda: tse.logprobs(lg, tg.cpu()), r"logits is on cuda.* but targets is on cpu"),
        ]
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_naming_the_argument(device):
    assert_each_raises(bad_calls(device))
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
