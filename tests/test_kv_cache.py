"""store_kv against tokenspeed_ext.reference on fresh random inputs (hypothesis), on CPU
and on CUDA when present, plus a CUDA-only check at model head dims, opcheck,
torch.compile and argument checks. The copy is exact, so every check is bitwise.

store_kv on the engine's strided q/k/v views of one projection row is checked beside
paged attention, in test_attention.py.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from op_testing import DEV, FLOATS, SETTINGS, assert_each_raises, sanitized_dtypes, seeds

import tokenspeed_ext as tse
import tokenspeed_ext.ops  # noqa: F401 - registers torch.ops.tokenspeed.*
from tokenspeed_ext import reference as ref


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sanitized_dtypes(torch.float32, torch.bfloat16))
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
    ref.store_kv(k, v, rk, rv, slots)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


# ---- opcheck, compile, bad arguments ----

def small_case(device):
    """k, v, k_cache, v_cache, slot_mapping: slots out of order, one row skipped (-1)."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(5, 2, 8, generator=g).to(device) for _ in range(2))
    caches = [torch.randn(4, 3, 2, 8, generator=g).to(device) for _ in range(2)]
    slots = torch.tensor([4, -1, 0, 11, 7], device=device)
    return k, v, *caches, slots


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(torch.ops.tokenspeed.store_kv, small_case(device))


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_compiles_fullgraph(device):
    k, v, kc, vc, slots = small_case(device)

    def store(k, v, kc, vc, slots):
        tse.store_kv(k, v, kc, vc, slots)
        return kc.sum() + vc.sum()

    kc2, vc2 = kc.clone(), vc.clone()
    torch.compile(store, fullgraph=True, backend="aot_eager")(k, v, kc, vc, slots)
    store(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def bad_calls(device):
    """(call, regex naming the argument and value) for every argument check."""
    k = torch.randn(2, 2, 4, device=device)
    kc = torch.randn(3, 4, 2, 4, device=device)
    slots = torch.tensor([0, 5], device=device)
    calls = [
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
    ]
    if device == "cpu":
        k1, v1 = torch.randn(4, 1, 16), torch.randn(4, 1, 16)
        cache = torch.zeros(2, 4, 1, 16)
        calls += [
            (lambda: tse.store_kv(k1, v1, cache, cache.to("meta"), torch.arange(4)),
             "v_cache is on meta"),
        ]
    else:
        calls += [
            (lambda: tse.store_kv(k, k, kc, kc.clone(), slots.cpu()), r"slot_mapping"),
        ]
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_naming_the_argument(device):
    assert_each_raises(bad_calls(device))
    # a rejected call leaves the op usable
    k, kc = torch.randn(2, 2, 4, device=device), torch.randn(3, 4, 2, 4, device=device)
    slots = torch.tensor([0, 5], device=device)
    got, want = [kc.clone(), kc.clone()], [kc.clone(), kc.clone()]
    tse.store_kv(k, k, *got, slots)
    ref.store_kv(k, k, *want, slots)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
