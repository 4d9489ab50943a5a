"""What the op-family tests (test_logprobs, test_attention, test_kv_cache, test_fused) share:
the hypothesis settings and draws, the derived error bounds, padded inputs, the dtype
parameters of the CUDA tests that run under compute-sanitizer, and the bad-call loop.

Tolerances are derived: a kernel's error against the float64 reference must stay within
a small multiple of PyTorch's own error on the same input (assert_within_own_error), or
within a stated number of units in the last place of a torch composition at the same
dtype (assert_within_ulps).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import strategies as st

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.differing_executors])
seeds = st.integers(0, 2**31 - 1)
DEV = "cuda"  # the device of the CUDA-only tests
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def sanitized_dtypes(*dtypes):
    """dtype parameters (ids fp32/bf16/fp16) of a `sanitize` test: its 16-bit cases run
    under compute-sanitizer, its fp32 cases stay out of that run."""
    return [pytest.param(d, id=DTYPE_IDS[d],
                         marks=() if d == torch.float32 else pytest.mark.sanitize)
            for d in dtypes]


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


def ulp(t, dtype):
    """Unit in the last place of dtype at the magnitudes of t (float64; the smallest
    normal's near zero)."""
    _, exp = torch.frexp(t.double().abs().clamp_min(torch.finfo(dtype).tiny))
    return torch.pow(2.0, (exp - 1 - MANTISSA_BITS[dtype]).double())


def assert_within_ulps(actual, expected, ulps, extra=None, what=""):
    """|actual - expected| <= ulps units in the last place of expected's dtype at the
    larger magnitude of the two, plus `extra` (an absolute allowance per entry)."""
    dtype = expected.dtype
    assert actual.dtype == dtype and actual.shape == expected.shape, what
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: nan pattern differs"
    ok = ~torch.isnan(e)
    unit = ulp(torch.maximum(a.abs(), e.abs()), dtype)
    allowed = ulps * unit + (0.0 if extra is None else extra.double().cpu())
    diff = (a - e).abs()
    bad = ok & (diff > allowed)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {e.numel()} entries beyond the "
                           f"allowance, worst {float((diff / unit)[ok].max()):.3g} ulp")


def padded_rows(g, shape, dtype, device, pad, scale=1.0):
    """A tensor of `shape` whose rows are a [..., :H] view of a wider buffer when pad > 0."""
    *lead, h = shape
    x = torch.randn(*lead, h + pad, generator=g, dtype=torch.float64) * scale
    return x.to(dtype).to(device)[..., :h]


def assert_each_raises(calls):
    """Every (call, regex) of a bad-argument table raises a RuntimeError matching its regex.

    The tables' CPU rows include a meta tensor among CPU ones: the dispatcher sends such a
    call to the fake kernel, which must refuse mixed devices as the real kernels do, not
    hand back uninitialised memory.
    """
    for call, pattern in calls:
        with pytest.raises(RuntimeError, match=pattern):
            call()
