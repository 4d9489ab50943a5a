"""CUDA-only checks of the kernels: larger shapes, the tensor-core attention paths (page
sizes 1, 5, 16, 64, 128; D = 64, 128; the wgmma kernel that sm_90 devices run by default
and the mma.sync kernel of other devices, forced with TOKENSPEED_ATTENTION_KERNEL), and that a row's or a request's result does not
depend on the rest of the batch (bitwise). Tests named *small* are the ones run under
compute-sanitizer by bench/run_gpu.sh."""
from __future__ import annotations

import math

import pytest
import torch

import tokenspeed_ext as tse
from tokenspeed_ext import reference

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(params=["default", "mma_sync"])
def attention_kernel(request, monkeypatch):
    """Runs the test with the device's default attention kernel, then with mma.sync."""
    if request.param == "mma_sync":
        monkeypatch.setenv("TOKENSPEED_ATTENTION_KERNEL", "mma_sync")
    else:
        monkeypatch.delenv("TOKENSPEED_ATTENTION_KERNEL", raising=False)
    return request.param


def _name(x) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[x]


def _logits(t: int, v: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(t, v, generator=gen, device=DEV) * 4).to(dtype)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_name)
@pytest.mark.parametrize("t,v", [(1, 1), (3, 7), (5, 8193), (2, 32769), (17, 32000),
                                 (4, 151936)])
def test_logprobs_small(dtype, t, v):
    gen = torch.Generator(DEV).manual_seed(t * 1000 + v)
    x = _logits(t, v, dtype, gen)
    tgt = torch.randint(0, v, (t,), device=DEV, generator=gen)
    for temp in (1.0, 0.7):
        lp, ent = tse.logprobs(x, tgt, temperature=temp, return_entropy=True)
        rlp, rent = reference.logprobs(x, tgt, temp, return_entropy=True)
        torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)


def test_logprobs_strided_inf_and_empty_rows_small():
    gen = torch.Generator(DEV).manual_seed(1)
    wide = _logits(6, 1003, torch.bfloat16, gen)
    x = wide[:, 1:1000]  # unaligned rows, row stride 1003
    x[1, ::3] = -math.inf
    x[2] = -math.inf
    tgt = torch.tensor([0, 3, 2, 998, 500, 7], device=DEV)
    lp, ent = tse.logprobs(x, tgt, return_entropy=True)
    rlp, rent = reference.logprobs(x, tgt, return_entropy=True)
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


@pytest.mark.parametrize("v", [32000, 151936])
def test_logprobs_batch_independent(v):
    gen = torch.Generator(DEV).manual_seed(v)
    x = _logits(700, v, torch.bfloat16, gen)
    tgt = torch.randint(0, v, (700,), device=DEV, generator=gen)
    lp, ent = tse.logprobs(x, tgt, return_entropy=True)
    for lo, hi in [(0, 1), (5, 6), (3, 300), (699, 700)]:
        lp2, ent2 = tse.logprobs(x[lo:hi], tgt[lo:hi], return_entropy=True)
        assert torch.equal(lp2, lp[lo:hi]) and torch.equal(ent2, ent[lo:hi])


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
        rp = reference.logprob_partials(x[:, bounds[i]:bounds[i + 1]], tgt, bounds[i], 0.9)
        torch.testing.assert_close(p.double(), rp, rtol=1e-5, atol=1e-5)
        parts.append(p)
    lp, ent = tse.combine_logprob_partials(torch.stack(parts))
    rlp, rent = reference.logprobs(x, tgt, 0.9, return_entropy=True)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("hk,d", [(2, 64), (1, 3), (4, 128)])
def test_store_kv_small(dtype, hk, d):
    gen = torch.Generator(DEV).manual_seed(d)
    n, pages, page = 37, 10, 8
    k = torch.randn(n, hk, d, device=DEV, generator=gen).to(dtype)
    v = torch.randn(n, hk, d, device=DEV, generator=gen).to(dtype)
    slots = torch.randperm(pages * page, device=DEV, generator=gen)[:n]
    slots[::5] = -1
    kc = torch.randn(pages, page, hk, d, device=DEV, generator=gen).to(dtype)
    vc = torch.randn_like(kc)
    rk, rv = kc.clone(), vc.clone()
    tse.store_kv(k, v, kc, vc, slots)
    reference.store_kv(k, v, rk, rv, slots)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


def _paged_problem(new, prefix, hq, hk, d, page, dtype, seed):
    """Random q and caches for requests with `new` tokens after `prefix` cached ones."""
    gen = torch.Generator(DEV).manual_seed(seed)
    kv_lens = [a + b for a, b in zip(new, prefix)]
    need = [(L + page - 1) // page for L in kv_lens]
    total = sum(need) + 3
    perm = torch.randperm(total, device=DEV, generator=gen).to(torch.int32)
    max_pages = max(need + [1])
    table = torch.full((len(new), max_pages + 1), -1, dtype=torch.int32, device=DEV)
    at = 0
    for i, c in enumerate(need):
        table[i, :c] = perm[at:at + c]
        at += c
    kc = torch.randn(total, page, hk, d, device=DEV, generator=gen).to(dtype)
    vc = torch.randn(total, page, hk, d, device=DEV, generator=gen).to(dtype)
    q = torch.randn(sum(new), hq, d, device=DEV, generator=gen).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    return q, kc, vc, table, cu, lens


def _check_attention(args, dtype):
    out = tse.paged_prefill_attention(*args)
    ref = reference.paged_prefill_attention(*args)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
        return out
    # the error of the same math rounded at the input dtype bounds the kernel's
    own = reference.paged_prefill_attention(*args, dtype=torch.float32).to(dtype).double()
    bound = (own - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 4 * bound + 2e-3, (err, bound)
    assert _rel_err(out, ref) < 1e-2
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=_name)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("page", [1, 5, 16, 64, 128])
def test_attention_paths_small(dtype, d, page, attention_kernel):
    new, prefix = [1, 70, 33, 130], [0, 45, 200, 3]
    args = _paged_problem(new, prefix, 14, 2, d, page, dtype, seed=page * d)
    _check_attention(args, dtype)


@pytest.mark.parametrize("hq,hk", [(4, 4), (28, 4), (32, 8), (12, 1)])
def test_attention_groups(hq, hk, attention_kernel):
    new, prefix = [300, 1, 129, 64], [700, 5, 0, 64]
    args = _paged_problem(new, prefix, hq, hk, 128, 16, torch.bfloat16, seed=hq)
    _check_attention(args, torch.bfloat16)


def test_attention_odd_head_dim_small():
    args = _paged_problem([5, 9], [3, 0], 6, 3, 40, 4, torch.bfloat16, seed=3)
    _check_attention(args, torch.bfloat16)


def test_attention_long(attention_kernel):
    args = _paged_problem([2048], [1500], 28, 4, 128, 16, torch.bfloat16, seed=7)
    _check_attention(args, torch.bfloat16)


def test_attention_many_short_requests_small(attention_kernel):
    """Many work items per block (the wgmma kernel is persistent), most of them one K/V
    tile long, among a long request's items and the empty ones past short requests."""
    gen = torch.Generator().manual_seed(11)
    new = torch.randint(1, 65, (48,), generator=gen).tolist() + [600]
    prefix = torch.randint(0, 201, (48,), generator=gen).tolist() + [300]
    args = _paged_problem(new, prefix, 32, 8, 128, 16, torch.bfloat16, seed=11)
    _check_attention(args, torch.bfloat16)


@pytest.mark.parametrize("page", [16, 64])
def test_attention_batch_independent(page, attention_kernel):
    new, prefix = [200, 37, 513, 1], [100, 0, 900, 60]
    q, kc, vc, table, cu, lens = _paged_problem(new, prefix, 28, 4, 128, page,
                                                torch.bfloat16, seed=page)
    full = tse.paged_prefill_attention(q, kc, vc, table, cu, lens)
    for i in range(len(new)):
        a, b = cu[i].item(), cu[i + 1].item()
        one = tse.paged_prefill_attention(
            q[a:b], kc, vc, table[i:i + 1], torch.tensor([0, b - a], dtype=torch.int32,
                                                         device=DEV), lens[i:i + 1])
        assert torch.equal(one, full[a:b]), i


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_name)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
def test_store_kv_and_attention_read_fused_projection_views_small(dtype, slot_dtype,
                                                                   attention_kernel):
    """q, k, v as the engine passes them, views of one [N, (Hq + 2 Hk) * D] projection
    row, are read in place and give what contiguous copies give."""
    new, prefix, hq, hk, d, page = [70, 1, 130], [45, 0, 3], 14, 2, 128, 16
    _, kc, vc, table, cu, lens = _paged_problem(new, prefix, hq, hk, d, page, dtype, seed=11)
    n = sum(new)
    gen = torch.Generator(DEV).manual_seed(5)
    qkv = torch.randn(n, (hq + 2 * hk) * d, device=DEV, generator=gen).to(dtype)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(n, hk, d)
    v = qkv[:, (hq + hk) * d:].view(n, hk, d)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    table_h = table.cpu()
    slots = torch.tensor([int(table_h[i, p // page]) * page + p % page
                          for i, (a, b) in enumerate(zip(new, prefix)) for p in range(b, a + b)],
                         dtype=slot_dtype, device=DEV)
    slots[::7] = -1  # skipped rows
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    tse.store_kv(k, v, kc1, vc1, slots)
    reference.store_kv(k.contiguous(), v.contiguous(), kc2, vc2, slots.long())
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    out = tse.paged_prefill_attention(q, kc1, vc1, table, cu, lens)
    want = tse.paged_prefill_attention(q.contiguous(), kc1, vc1, table, cu, lens)
    assert torch.equal(out, want)
    _check_attention((q.contiguous(), kc1, vc1, table, cu, lens), dtype)
