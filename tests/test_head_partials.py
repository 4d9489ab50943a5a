"""The op head_logprob_partials (the log-prob partials of the LM head's product, the logits never
written) against the float64 reference on fresh random inputs, on CPU and on CUDA: the
fused kernel (16-bit operands, H and row strides multiples of 8) and the fallback of
every other call; the fused kernel's rows, and every path's with batch_invariant, do not
depend on the batch (bitwise); real widths;
opcheck, torch.compile and argument checks.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from op_testing import (DEV, FLOATS, SETTINGS, assert_each_raises, assert_within_own_error,
                        padded_rows, sanitized_dtypes, seeds)

import tokenspeed_ext as tse
import tokenspeed_ext.ops  # noqa: F401 - registers torch.ops.tokenspeed.*
from tokenspeed_ext import reference as ref


def make_head(g, t, v, h, dtype, device, scale, pad):
    """hidden [t, h] (a view of wider rows when pad > 0) and weight [v, h] whose logits
    have standard deviation about `scale`."""
    hidden = padded_rows(g, (t, h), dtype, device, pad)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (scale / math.sqrt(h))
    return hidden, weight.to(dtype).to(device)


def reference_scores(hidden, weight, targets, vocab_start, temperature):
    """(exact, own): the float64 scores of the float64 product, and PyTorch's own fp32
    product and log-softmax (the error the kernel is held to a multiple of)."""
    x64 = hidden.double() @ weight.double().T
    x32 = hidden.float() @ weight.float().T
    targets = targets.to(x64.device)
    exact = ref.combine_logprob_partials(
        ref.logprob_partials(x64, targets, vocab_start, temperature)[None])
    own = ref.combine_logprob_partials(
        ref.logprob_partials(x32, targets, vocab_start, temperature, dtype=torch.float32)[None],
        dtype=torch.float32)
    return exact, own


def check_head(case, t, v, h, device):
    g = torch.Generator().manual_seed(case["seed"])
    hidden, weight = make_head(g, t, v, h, case["dtype"], device, case["scale"], case["pad"])
    lo = case["vocab_start"]
    # some targets outside the shard: their t is -inf, as logprob_partials gives it
    targets = torch.randint(max(0, lo - 3), lo + v + 3, (t,), generator=g)
    targets = targets.to(case["target_dtype"]).to(device)
    temp = case["temperature"]
    parts = tse.head_logprob_partials(hidden, weight, targets, lo, temp)
    assert parts.shape == (t, 4) and parts.dtype == torch.float32
    lp, ent = tse.combine_logprob_partials(parts[None])
    exact, own = reference_scores(hidden, weight, targets, lo, temp)
    assert_within_own_error(lp, exact[0], own[0], what="logprob")
    assert_within_own_error(ent, exact[1], own[1], what="entropy")


head_cases = st.fixed_dictionaries(dict(
    seed=seeds,
    dtype=st.sampled_from(FLOATS),
    target_dtype=st.sampled_from([torch.int32, torch.int64]),
    temperature=st.one_of(st.just(1.0), st.floats(0.3, 3.0)),
    scale=st.sampled_from([1.0, 4.0, 30.0]),
    pad=st.sampled_from([0, 0, 8, 3]),  # 3: a row stride the fused kernel does not take
    vocab_start=st.sampled_from([0, 0, 37]),
))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, **SETTINGS)
@given(case=head_cases, t=st.integers(1, 300),
       v=st.one_of(st.sampled_from([1, 255, 256, 257, 1024, 1025]), st.integers(1, 1400)),
       h=st.sampled_from([8, 16, 64, 72, 136, 13]))
def test_head_partials_match_reference(device, case, t, v, h):
    check_head(case, t, v, h, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sanitized_dtypes(torch.bfloat16, torch.float16))
def test_head_partials_tiles_edges(dtype):
    """Rows past a 16-row-tile group, a vocabulary tail in the last tile, H past the last
    64-wide step, targets at the first and last column and outside the shard."""
    g = torch.Generator().manual_seed(7)
    t, v, h, lo = 2200, 3000 + 17, 200, 11
    hidden, weight = make_head(g, t, v, h, dtype, DEV, 3.0, 0)
    targets = torch.randint(lo, lo + v, (t,), generator=g)
    targets[:4] = torch.tensor([lo, lo + v - 1, lo - 1, lo + v])
    targets = targets.to(DEV)
    parts = tse.head_logprob_partials(hidden, weight, targets, lo, 0.8)
    lp, ent = tse.combine_logprob_partials(parts[None])
    exact, own = reference_scores(hidden, weight, targets, lo, 0.8)
    assert_within_own_error(lp, exact[0], own[0], what="logprob")
    assert_within_own_error(ent, exact[1], own[1], what="entropy")
    assert lp[2].item() == lp[3].item() == -math.inf


@pytest.mark.gpu
@pytest.mark.parametrize("h", [1536, 3584])
def test_head_partials_real_widths(h):
    """Qwen2.5-1.5B / 7B head widths and vocabulary, bf16, against float64."""
    g = torch.Generator().manual_seed(h)
    t, v = 192, 151936
    hidden, weight = make_head(g, t, v, h, torch.bfloat16, DEV, 4.0, 0)
    targets = torch.randint(0, v, (t,), generator=g).to(DEV)
    lp, ent = tse.combine_logprob_partials(
        tse.head_logprob_partials(hidden, weight, targets, 0, 1.0)[None])
    exact, own = reference_scores(hidden, weight, targets, 0, 1.0)
    assert_within_own_error(lp, exact[0], own[0], what="logprob")
    assert_within_own_error(ent, exact[1], own[1], what="entropy")


@pytest.mark.gpu
def test_head_rows_do_not_depend_on_the_batch():
    """The fused kernel's split and K order are fixed by V and H alone."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = make_head(g, 300, 1100, 136, torch.bfloat16, DEV, 4.0, 0)
    targets = torch.randint(0, 1100, (300,), generator=g).to(DEV)
    full = tse.head_logprob_partials(hidden, weight, targets, 0, 0.9)
    for a, b in [(0, 1), (5, 133), (130, 300), (17, 18), (255, 257)]:
        part = tse.head_logprob_partials(hidden[a:b].clone(), weight, targets[a:b], 0, 0.9)
        assert torch.equal(part, full[a:b]), (a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batch_invariant_rows_do_not_depend_on_the_batch(device, dtype):
    """batch_invariant=True: a row's partials are bitwise alike in every slice that holds
    it, on the fused kernel (CUDA bf16) and the fallback (CUDA fp32, CPU), whose last row
    block is then padded: single rows, slices within one block and across blocks (CPU
    blocks of 104 rows here, CUDA fallback blocks of 1677)."""
    g = torch.Generator().manual_seed(5)
    t, v = 2000, 40_000
    hidden, weight = make_head(g, t, v, 64, dtype, device, 4.0, 0)
    targets = torch.randint(0, v, (t,), generator=g).to(device)
    full = tse.head_logprob_partials(hidden, weight, targets, 0, 0.9, batch_invariant=True)
    for a, b in [(0, 1), (7, 8), (5, 133), (100, 1900), (1676, 1679), (1990, 2000)]:
        part = tse.head_logprob_partials(hidden[a:b].clone(), weight, targets[a:b], 0, 0.9,
                                         batch_invariant=True)
        assert torch.equal(part, full[a:b]), (a, b)
    exact, own = reference_scores(hidden, weight, targets, 0, 0.9)
    lp, ent = tse.combine_logprob_partials(full[None])
    assert_within_own_error(lp, exact[0], own[0], what="logprob")
    assert_within_own_error(ent, exact[1], own[1], what="entropy")


@pytest.mark.parametrize("device", DEVICES)
def test_head_partials_empty_rows(device):
    hidden = torch.randn(0, 64, device=device, dtype=torch.bfloat16)
    weight = torch.randn(10, 64, device=device, dtype=torch.bfloat16)
    out = tse.head_logprob_partials(hidden, weight, torch.zeros(0, dtype=torch.long,
                                                                device=device))
    assert out.shape == (0, 4)


# ---- opcheck, compile, bad arguments ----

def small_args(device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 16, generator=g).to(torch.bfloat16).to(device)
    weight = torch.randn(40, 16, generator=g).to(torch.bfloat16).to(device)
    targets = torch.randint(0, 40, (5,), generator=g).to(device)
    return hidden, weight, targets


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    hidden, weight, targets = small_args(device)
    for invariant in (False, True):
        torch.library.opcheck(torch.ops.tokenspeed.head_logprob_partials,
                              (hidden, weight, targets, 3, 1.1, True, invariant))


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_compiles_fullgraph(device):
    args = small_args(device)

    def score(hidden, weight, targets):
        parts = tse.head_logprob_partials(hidden, weight, targets)
        return tse.combine_logprob_partials(parts[None])

    compiled = torch.compile(score, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), score(*args)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_naming_the_argument(device):
    h, w, tg = small_args(device)
    calls = [
        (lambda: tse.head_logprob_partials(h.long(), w, tg), r"hidden must be float32"),
        (lambda: tse.head_logprob_partials(h, w.float(), tg),
         r"hidden is BFloat16 but weight is Float"),
        (lambda: tse.head_logprob_partials(h[:, :15], w, tg),
         r"hidden has 15 columns but weight has 16"),
        (lambda: tse.head_logprob_partials(h[0], w, tg), r"hidden must be 2-D"),
        (lambda: tse.head_logprob_partials(h, w[0], tg), r"weight must be 2-D"),
        (lambda: tse.head_logprob_partials(h, w[:0], tg), r"at least one vocabulary row"),
        (lambda: tse.head_logprob_partials(h, w, tg[:2]), r"targets has 2 entries but hidden "
                                                          r"has 5 rows"),
        (lambda: tse.head_logprob_partials(h, w, tg.float()), r"targets must be int32 or int64"),
        (lambda: tse.head_logprob_partials(h.t().contiguous().t(), w, tg),
         r"contiguous along H"),
        (lambda: tse.head_logprob_partials(h, w, tg, -1), r"vocab_start must be >= 0, got -1"),
        (lambda: tse.head_logprob_partials(h, w, tg - 50), r"targets\[\d\] is -\d+, below 0"),
        (lambda: tse.head_logprob_partials(h, w, tg, 0, 0.0), r"temperature must be finite"),
    ]
    if device == "cpu":
        calls.append((lambda: tse.head_logprob_partials(h, w, tg.to("meta")),
                      "targets is on meta but hidden is on cpu"))
    else:
        calls.append((lambda: tse.head_logprob_partials(h, w.cpu(), tg),
                      r"hidden is on cuda.* but weight is on cpu"))
    assert_each_raises(calls)
    # a rejected call leaves the op exact
    lp, _ = tse.combine_logprob_partials(tse.head_logprob_partials(h, w, tg)[None])
    exact, own = reference_scores(h, w, tg, 0, 1.0)
    assert_within_own_error(lp, exact[0], own[0], what="logprob after bad calls")
