"""paged_prefill_attention, tested by de-paging: each request's contiguous K/V is rebuilt
from a shuffled page table and compared with a dense causal reference (tokenspeed_ext.
reference), on fresh random inputs (hypothesis), on CPU and on CUDA when present; opcheck,
torch.compile and argument checks.

The CUDA-only tests cover the tensor-core paths (page sizes 1, 5, 16, 64, 128; D = 64,
128; the wgmma kernel that sm_90 devices run by default and the mma.sync kernel of other
devices, forced with TOKENSPEED_ATTENTION_KERNEL), that a request's result does not depend
on the rest of the batch (bitwise), and store_kv + attention on the engine's strided q/k/v
views of one projection row.

The kernel's error against the float64 reference must stay within a small multiple of
PyTorch's own error on the same input (the reference evaluated in the input dtype).
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


# ---- CUDA only ----

@pytest.fixture(params=["default", "cp_async", "mma_sync"])
def attention_kernel(request, monkeypatch):
    """Runs the test with the device's default attention kernel (on sm_90: wgmma, whole
    pages by TMA), with its K/V loads all by cp.async, then with mma.sync."""
    monkeypatch.delenv("TOKENSPEED_ATTENTION_KERNEL", raising=False)
    monkeypatch.delenv("TOKENSPEED_ATTENTION_KV_LOAD", raising=False)
    if request.param == "mma_sync":
        monkeypatch.setenv("TOKENSPEED_ATTENTION_KERNEL", "mma_sync")
    elif request.param == "cp_async":
        monkeypatch.setenv("TOKENSPEED_ATTENTION_KV_LOAD", "cp_async")
    return request.param


def _rel_err(x: torch.Tensor, want: torch.Tensor) -> float:
    return ((x.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _paged_problem(new, prefix, hq, hk, d, page, dtype, seed, runs=False, run_pages=0):
    """Random q and caches for requests with `new` tokens after `prefix` cached ones. Pages
    are shuffled, or with `runs` each request's pages lie in two runs of consecutive pages
    (cut at a random place), or with `run_pages` in runs of that many consecutive pages;
    the runs in random order with random gaps between them."""
    gen = torch.Generator(DEV).manual_seed(seed)
    kv_lens = [a + b for a, b in zip(new, prefix)]
    need = [(L + page - 1) // page for L in kv_lens]
    max_pages = max(need + [1])
    table = torch.full((len(new), max_pages + 1), -1, dtype=torch.int32, device=DEV)
    if runs or run_pages:
        cpu = torch.Generator().manual_seed(seed)
        pieces = []
        for i, c in enumerate(need):
            if run_pages:
                pieces += [(i, lo, min(lo + run_pages, c)) for lo in range(0, c, run_pages)]
                continue
            cut = int(torch.randint(0, c + 1, (1,), generator=cpu))
            pieces += [(i, 0, cut), (i, cut, c)]
        total = 0
        for k in torch.randperm(len(pieces), generator=cpu).tolist():
            i, lo, hi = pieces[k]
            total += int(torch.randint(0, 2, (1,), generator=cpu))
            table[i, lo:hi] = torch.arange(total, total + hi - lo, dtype=torch.int32)
            total += hi - lo
        total += 3
    else:
        total = sum(need) + 3
        perm = torch.randperm(total, device=DEV, generator=gen).to(torch.int32)
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


def _wgmma_device() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


def _check_attention(args, dtype):
    out = tse.paged_prefill_attention(*args)
    want = ref.paged_prefill_attention(*args)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
        return out
    # the error of the same math rounded at the input dtype bounds the kernel's
    own = ref.paged_prefill_attention(*args, dtype=torch.float32).to(dtype).double()
    bound = (own - want).abs().max().item()
    err = (out.double() - want).abs().max().item()
    assert err <= 4 * bound + 2e-3, (err, bound)
    assert _rel_err(out, want) < 1e-2
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sanitized_dtypes(torch.bfloat16, torch.float16,
                                                   torch.float32))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("page", [1, 5, 16, 64, 128])
def test_attention_paths_small(dtype, d, page, attention_kernel):
    new, prefix = [1, 70, 33, 130], [0, 45, 200, 3]
    args = _paged_problem(new, prefix, 14, 2, d, page, dtype, seed=page * d)
    _check_attention(args, dtype)


def _poison_unread_slots(kc, vc, table, lens):
    """NaN into every cache slot no request reads (the rest of a last page, unused pages)."""
    page = kc.shape[1]
    read = torch.zeros(kc.shape[0] * page, dtype=torch.bool, device=kc.device)
    for i, n in enumerate(lens.tolist()):
        keys = torch.arange(n, device=kc.device)
        read[table[i, keys // page].long() * page + keys % page] = True
    for cache in (kc, vc):
        cache.view(-1, *cache.shape[2:])[~read] = math.nan


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sanitized_dtypes(torch.bfloat16, torch.float16))
@pytest.mark.parametrize("page", [4, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("d", [64, 128])
def test_attention_kv_loads_tma_and_cp_async_agree_small(dtype, page, d, monkeypatch):
    """sm_90: with pages of 64 keys or more the wgmma kernel loads whole pages by TMA
    (required here) and a request's partial last page by cp.async, zero past its keys;
    with pages of 4-32 keys, each 64-key half of a tile by one TMA box where its pages are
    consecutive in the cache and by cp.async where not (here each request's pages lie in
    two runs) or past the request's last whole half. With NaN in every slot no request reads, it
    matches the reference, and bitwise what cp.async alone and the default choice give."""
    if not _wgmma_device():
        pytest.skip("the wgmma kernel runs on sm_90 devices")
    monkeypatch.delenv("TOKENSPEED_ATTENTION_KERNEL", raising=False)
    # kv lens: one key, whole pages, a partial last page, 128-key tiles and past them
    new, prefix = [1, 130, 77, 256, 40, 300, 900], [0, 126, 300, 0, 1, 211, 157]
    args = _paged_problem(new, prefix, 28, 4, d, page, dtype, seed=page + d, runs=True)
    _poison_unread_slots(args[1], args[2], args[3], args[5])
    monkeypatch.setenv("TOKENSPEED_ATTENTION_KV_LOAD", "tma")
    out = _check_attention(args, dtype)
    for load in ("cp_async", "auto"):
        monkeypatch.setenv("TOKENSPEED_ATTENTION_KV_LOAD", load)
        assert torch.equal(tse.paged_prefill_attention(*args), out), load


@pytest.mark.gpu
@pytest.mark.parametrize("page", [4, 16, 32])
@pytest.mark.parametrize("run_pages", [5, 24])
def test_attention_kv_load_runs_over_long_requests(page, run_pages, monkeypatch):
    """Small pages in runs of run_pages consecutive pages, placed anywhere: the wgmma
    kernel finds which 64-key halves lie within one run (TMA) and which do not (cp.async)
    a chunk of 16 K/V tiles (2048 keys) at a time. Requests of one to three chunks, runs
    across the chunks' bounds: bitwise what cp.async alone gives, and the reference."""
    if not _wgmma_device():
        pytest.skip("the wgmma kernel runs on sm_90 devices")
    monkeypatch.delenv("TOKENSPEED_ATTENTION_KERNEL", raising=False)
    new, prefix = [64, 300, 1, 90], [4040, 2200, 2100, 500]
    args = _paged_problem(new, prefix, 28, 4, 128, page, torch.bfloat16,
                          seed=page * run_pages, run_pages=run_pages)
    _poison_unread_slots(args[1], args[2], args[3], args[5])
    monkeypatch.setenv("TOKENSPEED_ATTENTION_KV_LOAD", "tma")
    out = _check_attention(args, torch.bfloat16)
    monkeypatch.setenv("TOKENSPEED_ATTENTION_KV_LOAD", "cp_async")
    assert torch.equal(tse.paged_prefill_attention(*args), out)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 64])
def test_attention_one_long_request_among_many_short(page, attention_kernel):
    """The wgmma kernel's blocks claim items from a plan that numbers each request's
    items (requests without new tokens have none): one long request among many short
    ones, some with no new tokens or a long cached prefix, all match the reference, and
    each request alone gives bitwise what it gives in the batch."""
    gen = torch.Generator().manual_seed(page)
    n = 70
    new = torch.randint(0, 6, (n,), generator=gen).tolist()
    prefix = torch.randint(0, 300, (n,), generator=gen).tolist()
    new[17], prefix[17] = 3000, 5
    new[3], prefix[3] = 0, 40
    new[69], prefix[69] = 2, 1500
    args = _paged_problem(new, prefix, 28, 4, 128, page, torch.bfloat16, seed=page)
    out = _check_attention(args, torch.bfloat16)
    q, kc, vc, table, cu, lens = args
    for i in (17, 69, 5):
        s, e = cu[i].item(), cu[i + 1].item()
        one = tse.paged_prefill_attention(q[s:e], kc, vc, table[i:i + 1],
                                          torch.tensor([0, e - s], dtype=torch.int32,
                                                       device=DEV), lens[i:i + 1])
        assert torch.equal(one, out[s:e]), i


@pytest.mark.gpu
def test_attention_tma_required_where_pages_do_not_tile_fails(monkeypatch):
    """TOKENSPEED_ATTENTION_KV_LOAD=tma is a test hook: pages TMA does not serve (not
    tiling a 128-key tile, or more than 32 to a tile) fail the call rather than silently
    gathering."""
    if not _wgmma_device():
        pytest.skip("the wgmma kernel runs on sm_90 devices")
    monkeypatch.delenv("TOKENSPEED_ATTENTION_KERNEL", raising=False)
    monkeypatch.setenv("TOKENSPEED_ATTENTION_KV_LOAD", "tma")
    for page in (2, 5, 96):
        args = _paged_problem([40], [90], 8, 2, 128, page, torch.bfloat16, seed=1)
        with pytest.raises(RuntimeError, match="not supported"):
            tse.paged_prefill_attention(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(4, 4), (28, 4), (32, 8), (12, 1)])
def test_attention_groups(hq, hk, attention_kernel):
    new, prefix = [300, 1, 129, 64], [700, 5, 0, 64]
    args = _paged_problem(new, prefix, hq, hk, 128, 16, torch.bfloat16, seed=hq)
    _check_attention(args, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.sanitize
def test_attention_odd_head_dim_small():
    args = _paged_problem([5, 9], [3, 0], 6, 3, 40, 4, torch.bfloat16, seed=3)
    _check_attention(args, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_attention_long(d, attention_kernel):
    args = _paged_problem([2048], [1500], 28, 4, d, 16, torch.bfloat16, seed=7 + d)
    _check_attention(args, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.sanitize
def test_attention_many_short_requests_small(attention_kernel):
    """Many work items per block (the wgmma kernel is persistent), most of them one K/V
    tile long, among a long request's items and the empty ones past short requests."""
    gen = torch.Generator().manual_seed(11)
    new = torch.randint(1, 65, (48,), generator=gen).tolist() + [600]
    prefix = torch.randint(0, 201, (48,), generator=gen).tolist() + [300]
    args = _paged_problem(new, prefix, 32, 8, 128, 16, torch.bfloat16, seed=11)
    _check_attention(args, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("d", [64, 128])
def test_attention_batch_independent(page, d, attention_kernel):
    new, prefix = [200, 37, 513, 1], [100, 0, 900, 60]
    q, kc, vc, table, cu, lens = _paged_problem(new, prefix, 28, 4, d, page,
                                                torch.bfloat16, seed=page + d)
    full = tse.paged_prefill_attention(q, kc, vc, table, cu, lens)
    for i in range(len(new)):
        a, b = cu[i].item(), cu[i + 1].item()
        one = tse.paged_prefill_attention(
            q[a:b], kc, vc, table[i:i + 1], torch.tensor([0, b - a], dtype=torch.int32,
                                                         device=DEV), lens[i:i + 1])
        assert torch.equal(one, full[a:b]), i


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sanitized_dtypes(torch.bfloat16, torch.float32))
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
    ref.store_kv(k.contiguous(), v.contiguous(), kc2, vc2, slots.long())
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    out = tse.paged_prefill_attention(q, kc1, vc1, table, cu, lens)
    want = tse.paged_prefill_attention(q.contiguous(), kc1, vc1, table, cu, lens)
    assert torch.equal(out, want)
    _check_attention((q.contiguous(), kc1, vc1, table, cu, lens), dtype)


# ---- opcheck, compile, bad arguments ----

def small_case(device):
    """q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens of three requests, one with
    no new tokens and one with no prefix."""
    g = torch.Generator().manual_seed(0)
    return make_paged_batch(g, device, torch.float32, [3, 0, 2], [2, 4, 0], 3, 2, 2, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(torch.ops.tokenspeed.paged_prefill_attention,
                          (*small_case(device), None))


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_compiles_fullgraph(device):
    paged = small_case(device)

    def attend(*paged):
        return (tse.paged_prefill_attention(*paged),
                tse.paged_prefill_attention(*paged, scale=0.3))

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*paged), attend(*paged)):
        assert torch.equal(got, want)


def bad_calls(device):
    """(call, regex naming the argument and value) for every argument check."""
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
    if device == "cpu":
        q1, cache = torch.randn(4, 2, 16), torch.zeros(2, 4, 1, 16)
        calls += [
            (lambda: tse.paged_prefill_attention(
                q1, cache, cache, torch.zeros(1, 2, dtype=torch.int32).to("meta"),
                torch.tensor([0, 4], dtype=torch.int32), torch.tensor([4], dtype=torch.int32)),
             "page_table is on meta"),
        ]
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_naming_the_argument(device):
    assert_each_raises(bad_calls(device))
    # a rejected call leaves the op usable
    paged = small_case(device)
    assert torch.isfinite(tse.paged_prefill_attention(*paged)).all()
