"""The fused decoder-layer ops (rms_norm, silu_and_mul, rotary_embedding) against
tokenspeed_ext.reference and against the exact torch composition the models ran before
(HF's rounding points), plus opcheck, torch.compile and argument checks. Runs on CPU, and
on CUDA when present.

Two bounds per op: against the torch composition at the same dtype, within a stated
number of units in the last place (1 for bf16/fp16, where only a different fp32 rounding
inside the chain can flip a final rounding; a few for fp32, where the sum of squares or
exp is evaluated in another order or by another libm); against the float64 reference,
within a small multiple of the composition's own error (derived, see op_testing.py).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from op_testing import (FLOATS, SETTINGS, assert_each_raises, assert_within_own_error,
                        assert_within_ulps, padded_rows, sanitized_dtypes, seeds, ulp)

import tokenspeed_ext as tse
import tokenspeed_ext.ops  # noqa: F401 - registers torch.ops.tokenspeed.*
from tokenspeed_ext import reference as ref


def assert_rms_norm_close(out, x, weight, eps, residual, what):
    """Against HF's chain: the fp32 normalisation may round y = (h * rs).to(dtype) one
    ulp the other way (the sum of squares is added in another order), which the weight
    multiply scales by |weight| before its own rounding."""
    want, _ = torch_rms_norm(x, weight, eps, residual)
    h = (x if residual is None else x + residual).float()
    y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    ulps = 4 if x.dtype == torch.float32 else 1
    extra = ulps * weight.double().abs() * ulp(y, x.dtype).to(weight.device)
    assert_within_ulps(out, want, ulps, extra=extra, what=what)


# ---- the torch compositions the engine ran before the fused ops (HF's code) ----

def torch_rms_norm(x, weight, eps, residual=None):
    h = x if residual is None else x + residual
    dtype = h.dtype
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(dtype), h


def torch_silu_and_mul(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def torch_rotary(positions, x, cos_sin_cache):
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache[positions.long()]
    cos = torch.cat((cs[:, :half], cs[:, :half]), -1).to(x.dtype).unsqueeze(1)
    sin = torch.cat((cs[:, half:], cs[:, half:]), -1).to(x.dtype).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---- rms_norm ----

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=120, **SETTINGS)
@given(seed=seeds, dtype=st.sampled_from(FLOATS), n=st.integers(1, 9),
       m=st.sampled_from([None, None, 1, 3]),
       h=st.one_of(st.sampled_from([1, 7, 64, 127, 128, 1536, 1537]), st.integers(1, 3000)),
       with_residual=st.booleans(), pad=st.sampled_from([0, 0, 3, 8]),
       scale=st.sampled_from([1.0, 30.0]), eps=st.sampled_from([1e-6, 1e-5, 0.0]))
def test_rms_norm(device, seed, dtype, n, m, h, with_residual, pad, scale, eps):
    g = torch.Generator().manual_seed(seed)
    shape = (n, h) if m is None else (n, m, h)
    x = padded_rows(g, shape, dtype, device, pad, scale)
    residual = padded_rows(g, shape, dtype, device, 0, scale) if with_residual else None
    weight = (torch.randn(h, generator=g, dtype=torch.float64) * 0.5 + 1).to(dtype).to(device)
    out, h_out = torch.ops.tokenspeed.rms_norm(x, weight, eps, residual)
    want, want_h = torch_rms_norm(x, weight, eps, residual)
    assert out.is_contiguous() and out.shape == x.shape
    if with_residual:
        assert torch.equal(h_out, want_h), "the residual add is rounded as torch rounds it"
    else:
        assert h_out.shape == (0,) and h_out.dtype == dtype
    assert_rms_norm_close(out, x, weight, eps, residual, "rms_norm vs torch")
    exact, _ = ref.rms_norm(x, weight, eps, residual)
    assert_within_own_error(out, exact, want, factor=2.0, floor=1e-6, what="rms_norm")
    wrapped = tse.rms_norm(x, weight, eps, residual)
    assert torch.equal(wrapped[0] if with_residual else wrapped, out)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_real_shapes_match_torch(device):
    g = torch.Generator().manual_seed(3)
    for dtype in FLOATS:
        for h in (1536, 3584, 4096):
            x = padded_rows(g, (33, h), dtype, device, 0)
            r = padded_rows(g, (33, h), dtype, device, 0)
            w = (torch.randn(h, generator=g) * 0.2 + 1).to(dtype).to(device)
            out, h_out = tse.rms_norm(x, w, 1e-6, r)
            _, want_h = torch_rms_norm(x, w, 1e-6, r)
            assert torch.equal(h_out, want_h)
            assert_rms_norm_close(out, x, w, 1e-6, r, f"{dtype} H={h}")


# ---- silu_and_mul ----

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=120, **SETTINGS)
@given(seed=seeds, dtype=st.sampled_from(FLOATS), n=st.integers(1, 9),
       inter=st.one_of(st.sampled_from([1, 7, 8, 64, 129, 8960]), st.integers(1, 3000)),
       pad=st.sampled_from([0, 0, 5, 16]), scale=st.sampled_from([1.0, 4.0, 40.0]))
def test_silu_and_mul(device, seed, dtype, n, inter, pad, scale):
    g = torch.Generator().manual_seed(seed)
    gate_up = padded_rows(g, (n, 2 * inter), dtype, device, pad, scale)
    out = tse.silu_and_mul(gate_up)
    want = torch_silu_and_mul(gate_up)
    assert out.is_contiguous()
    # silu rounds to the dtype before the product, so a silu rounded one ulp the other way
    # (another exp: libm or the device's against Sleef's) moves the output by |up| ulp(silu)
    gate, up = gate_up.chunk(2, dim=-1)
    ulps = 4 if dtype == torch.float32 else 1
    extra = ulps * up.double().abs() * ulp(F.silu(gate), dtype).to(up.device)
    assert_within_ulps(out, want, ulps, extra=extra, what="silu_and_mul vs torch")
    assert_within_own_error(out, ref.silu_and_mul(gate_up), want, factor=2.0, floor=1e-6,
                            what="silu_and_mul")


# ---- rotary_embedding ----

def inv_freq(d, theta):
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def qkv_views(g, n, hq, hk, d, dtype, device, pad):
    """q [n, hq, d], k [n, hk, d] as views into a fused qkv row (then v and padding)."""
    width = (hq + 2 * hk) * d
    qkv = padded_rows(g, (n, width), dtype, device, pad)
    q = qkv[:, :hq * d].view(n, hq, d) if pad == 0 else qkv[:, :hq * d].unflatten(1, (hq, d))
    k = qkv[:, hq * d:(hq + hk) * d].unflatten(1, (hk, d))
    return qkv, q, k


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=120, **SETTINGS)
@given(seed=seeds, dtype=st.sampled_from(FLOATS),
       pos_dtype=st.sampled_from([torch.int32, torch.int64]), n=st.integers(1, 9),
       hq=st.integers(1, 8), hk=st.integers(1, 3),
       d=st.one_of(st.sampled_from([2, 6, 64, 128]), st.integers(1, 100).map(lambda v: 2 * v)),
       max_pos=st.sampled_from([1, 17, 4096, 40000]), pad=st.sampled_from([0, 0, 3, 8]),
       theta=st.sampled_from([10000.0, 1e6]), factor=st.sampled_from([1.0, 1.2]))
def test_rotary_embedding(device, seed, dtype, pos_dtype, n, hq, hk, d, max_pos, pad, theta,
                          factor):
    g = torch.Generator().manual_seed(seed)
    qkv, q, k = qkv_views(g, n, hq, hk, d, dtype, device, pad)
    cache = ref.rope_cos_sin_cache(inv_freq(d, theta), max_pos, factor).to(device)
    positions = torch.randint(0, max_pos, (n,), generator=g).to(pos_dtype).to(device)
    before = qkv.clone()
    want_q, want_k = torch_rotary(positions, q, cache), torch_rotary(positions, k, cache)
    exact_q, exact_k = ref.rotary_embedding(positions, q, k, cache)
    tse.rotary_embedding(positions, q, k, cache)
    assert_within_ulps(q, want_q, 1, what="rotary q vs torch")
    assert_within_ulps(k, want_k, 1, what="rotary k vs torch")
    # v and the padding are never written
    assert torch.equal(qkv[:, (hq + hk) * d:], before[:, (hq + hk) * d:])
    assert_within_own_error(q, exact_q, want_q, factor=2.0, floor=1e-6, what="rotary q")
    assert_within_own_error(k, exact_k, want_k, factor=2.0, floor=1e-6, what="rotary k")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sanitized_dtypes(torch.bfloat16, torch.float16))
def test_fused_kernels_small(dtype):
    """Fixed small cases of every fused kernel (odd widths, strided and 3-D rows, the
    residual on and off), cheap enough to run under compute-sanitizer; the property
    tests above draw the rest."""
    rms_cases = [(3, None, 24, False, 0), (5, 3, 40, True, 3), (2, None, 1000, True, 8)]
    for seed, (n, m, h, residual, pad) in enumerate(rms_cases):
        test_rms_norm.hypothesis.inner_test("cuda", seed, dtype, n, m, h, residual, pad,
                                            1.0, 1e-6)
    for seed, (n, inter, pad) in enumerate([(1, 1, 0), (4, 37, 3), (3, 1000, 8)]):
        test_silu_and_mul.hypothesis.inner_test("cuda", seed, dtype, n, inter, pad, 1.0)
    rotary_cases = [(3, 4, 2, 128, 4096, 0), (2, 3, 1, 6, 17, 3), (5, 8, 2, 64, 40000, 8)]
    for seed, (n, hq, hk, d, max_pos, pad) in enumerate(rotary_cases):
        test_rotary_embedding.hypothesis.inner_test("cuda", seed, dtype, torch.int32, n, hq, hk,
                                                    d, max_pos, pad, 10000.0, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_embedding_matches_engine_layer_bitwise(device):
    """The engine's RotaryEmbedding table holds the angles' cos/sin as its former per-call
    path computed them on the device (to the device's own cos/sin rounding), and the op
    applies them as that path's torch composition did."""
    from tokenspeed.layers.rotary import RotaryEmbedding
    g = torch.Generator().manual_seed(7)
    params = {"rope_type": "default", "rope_theta": 1e6}
    rope = RotaryEmbedding(128, params, 4096).to(device)
    positions = torch.randint(0, 4096, (40,), generator=g).to(device)
    freqs = positions.float().unsqueeze(-1) * rope.inv_freq.unsqueeze(0)
    table = rope.cos_sin_cache[positions]
    # cos/sin of the same fp32 angles; CPU and CUDA libm may differ by an ulp or two
    torch.testing.assert_close(table, torch.cat((freqs.cos(), freqs.sin()), dim=-1),
                               rtol=0, atol=2.5e-7)
    for dtype in FLOATS:
        q = padded_rows(g, (40, 12, 128), dtype, device, 0)
        cos = torch.cat((table[:, :64], table[:, :64]), dim=-1).to(dtype).unsqueeze(1)
        sin = torch.cat((table[:, 64:], table[:, 64:]), dim=-1).to(dtype).unsqueeze(1)
        x1, x2 = q.chunk(2, dim=-1)
        want = q * cos + torch.cat((-x2, x1), dim=-1) * sin
        k = q[:, :2].clone()
        tse.rotary_embedding(positions, q, k, rope.cos_sin_cache)
        assert_within_ulps(q, want, 1, what=f"engine rotary {dtype}")


# ---- opcheck, compile, bad arguments ----

def small_cases(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=g).to(device)
    x3 = torch.randn(4, 3, 16, generator=g).to(device)[:, :, :8]
    w = torch.randn(24, generator=g).to(device)
    r = torch.randn(5, 24, generator=g).to(device)
    gate_up = torch.randn(5, 2 * 9, generator=g).to(device)
    q = torch.randn(5, 4, 8, generator=g).to(device)
    k = torch.randn(5, 2, 8, generator=g).to(device)
    cache = ref.rope_cos_sin_cache(inv_freq(8, 10000.0), 32).to(device)
    pos = torch.tensor([0, 31, 5, 5, 17], device=device)
    return {
        "rms_norm": (torch.ops.tokenspeed.rms_norm, (x, w, 1e-6, None)),
        "rms_norm_residual": (torch.ops.tokenspeed.rms_norm, (x, w, 1e-5, r)),
        "rms_norm_3d": (torch.ops.tokenspeed.rms_norm, (x3, w[:8], 1e-6, None)),
        "silu_and_mul": (torch.ops.tokenspeed.silu_and_mul, (gate_up,)),
        "rotary_embedding": (torch.ops.tokenspeed.rotary_embedding, (pos, q, k, cache, True)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rms_norm", "rms_norm_residual", "rms_norm_3d",
                                  "silu_and_mul", "rotary_embedding"])
def test_opcheck(device, name):
    op, args = small_cases(device)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_wrappers_compile_fullgraph(device):
    cases = small_cases(device)
    x, w, _, _ = cases["rms_norm"][1]
    r = cases["rms_norm_residual"][1][3]
    gate_up = cases["silu_and_mul"][1][0]
    pos, q, k, cache, _ = cases["rotary_embedding"][1]

    def layer(x, w, r, gate_up, pos, q, k, cache):
        normed, h = tse.rms_norm(x, w, 1e-6, r)
        tse.rotary_embedding(pos, q, k, cache, validate=False)
        return normed, h, tse.rms_norm(x, w, 1e-6), tse.silu_and_mul(gate_up), q + 0, k + 0

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, r, gate_up, pos, q.clone(), k.clone(), cache)
    want = layer(x, w, r, gate_up, pos, q.clone(), k.clone(), cache)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def bad_calls(device):
    x = torch.randn(3, 8, device=device)
    w = torch.randn(8, device=device)
    gu = torch.randn(3, 8, device=device)
    q = torch.randn(3, 4, 6, device=device)
    k = torch.randn(3, 2, 6, device=device)
    cache = torch.randn(10, 6, device=device)
    pos = torch.tensor([0, 9, 3], device=device)
    rot = tse.rotary_embedding
    calls = [
        (lambda: tse.rms_norm(x.long(), w, 1e-6), r"x must be float32"),
        (lambda: tse.rms_norm(x[0], w, 1e-6), r"x must be \[N, H\] or \[N, M, H\]"),
        (lambda: tse.rms_norm(x[:, :0], w[:0], 1e-6), r"x must have at least one column"),
        (lambda: tse.rms_norm(x.t(), w[:3], 1e-6), r"x must be contiguous along its last"),
        (lambda: tse.rms_norm(x, w.half(), 1e-6), r"weight has dtype Half but x has Float"),
        (lambda: tse.rms_norm(x, w[:7], 1e-6), r"weight must be \[H\] with H = 8"),
        (lambda: tse.rms_norm(x, w, -1.0), r"eps must be finite and >= 0, got -1"),
        (lambda: tse.rms_norm(x, w, math.nan), r"eps must be finite and >= 0, got nan"),
        (lambda: tse.rms_norm(x, w, 1e-6, x.half()), r"residual has dtype Half"),
        (lambda: tse.rms_norm(x, w, 1e-6, x[:2]), r"residual has shape \[2, 8\]"),
        (lambda: tse.silu_and_mul(gu.int()), r"gate_up must be float32"),
        (lambda: tse.silu_and_mul(gu[0]), r"gate_up must be \[N, 2I\]"),
        (lambda: tse.silu_and_mul(gu[:, :7]), r"even number of columns, got 7"),
        (lambda: tse.silu_and_mul(gu[:, ::2]), r"gate_up must be contiguous along the col"),
        (lambda: rot(pos, q.long(), k, cache), r"q must be float32"),
        (lambda: rot(pos, q[0], k, cache), r"q must be \[N, Hq, D\]"),
        (lambda: rot(pos, q, k.half(), cache), r"k has dtype Half but q has Float"),
        (lambda: rot(pos, q, k[:2], cache), r"k has shape \[2, 2, 6\] but q has"),
        (lambda: rot(pos, q[..., :5], k[..., :5], cache[:, :5]),
         r"head dim must be even and >= 2, got 5"),
        (lambda: rot(pos, q[..., ::2], k[..., ::2], cache[:, :3]), r"head dim must be even"),
        (lambda: rot(pos, q.transpose(1, 2), k[..., :4], cache[:, :4].contiguous()),
         r"contiguous along the head dim"),
        (lambda: rot(pos.float(), q, k, cache), r"positions must be int32 or int64"),
        (lambda: rot(pos[:2], q, k, cache), r"positions must be \[N\] with N = 3"),
        (lambda: rot(pos, q, k, cache.double()), r"cos_sin_cache must be float32, got Double"),
        (lambda: rot(pos, q, k, cache[:, :4]), r"cos_sin_cache must be \[max_pos, D\]"),
        (lambda: rot(pos + 1, q, k, cache), r"positions\[1\] is 10, but cos_sin_cache holds 10"),
        (lambda: rot(pos - 1, q, k, cache), r"positions\[0\] is -1, below 0"),
    ]
    if device == "cpu":
        x1, w1 = torch.randn(5, 8), torch.randn(8)
        q1, k1 = torch.randn(4, 2, 16), torch.randn(4, 1, 16)
        calls += [
            (lambda: tse.rms_norm(x1, w1.to("meta"), 1e-6), "weight is on meta but x is on cpu"),
            (lambda: tse.rms_norm(x1, w1, 1e-6, x1.to("meta")), "residual is on meta"),
            (lambda: rot(torch.arange(4), q1, k1, torch.zeros(8, 16).to("meta")),
             "cos_sin_cache is on meta"),
        ]
    else:
        calls += [
            (lambda: tse.rms_norm(x, w.cpu(), 1e-6), r"x is on cuda.* but weight is on cpu"),
            (lambda: rot(pos.cpu(), q, k, cache), r"positions"),
        ]
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_naming_the_argument(device):
    assert_each_raises(bad_calls(device))


@pytest.mark.parametrize("device", DEVICES)
def test_rejected_rotary_leaves_q_k_untouched(device):
    q = torch.randn(3, 4, 6, device=device)
    k = torch.randn(3, 2, 6, device=device)
    q0, k0 = q.clone(), k.clone()
    with pytest.raises(RuntimeError, match=r"positions\[2\] is 10"):
        tse.rotary_embedding(torch.tensor([0, 1, 10], device=device), q, k,
                             torch.randn(10, 6, device=device))
    assert torch.equal(q, q0) and torch.equal(k, k0)
