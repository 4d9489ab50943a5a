"""The moe ops (moe_route, moe_dispatch, moe_combine, grouped_gemm) and the expert path of
the MoE layer against tokenspeed_ext.reference on fresh random inputs (hypothesis: token
counts from 0 to many per expert, empty experts, k = 1..8, E up to 256), plus opcheck,
torch.compile fullgraph and argument checks. Runs on CPU, and on CUDA when present.

Bounds: routing ids are exact on tie-free inputs (random fp32 logits); weights within a
few fp32 ulps of the float64 reference; dispatch is exact (a permutation); the fp32
combine and the grouped GEMM within a small multiple of PyTorch's own error at the input
dtype. The grouped GEMM is also batch-invariant: a row's output is bitwise the same
alone and among any other rows.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from op_testing import (DEV, FLOATS, SETTINGS, assert_each_raises, assert_within_own_error,
                        sanitized_dtypes, seeds)

import tokenspeed_ext as tse
import tokenspeed_ext.ops  # noqa: F401 - registers torch.ops.tokenspeed.*
from tokenspeed.layers.gemm import building_batch_invariant
from tokenspeed.layers.moe import FusedExperts, grouped_linear
from tokenspeed_ext import reference as ref


def _logits(g, t, e, dtype, device, scale=2.0):
    return (torch.randn(t, e, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _forced(g, t, e, k, device, replay_share=0.5):
    """[T, k] int32: a random replay row (distinct experts) for about replay_share of the
    rows, -1 rows (free) for the rest."""
    rows = []
    for _ in range(t):
        if torch.rand((), generator=g) < replay_share:
            rows.append(torch.randperm(e, generator=g)[:k])
        else:
            rows.append(torch.full((k,), -1))
    return (torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.long)) \
        .to(torch.int32).to(device)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, **SETTINGS)
@given(t=st.integers(0, 70), e=st.sampled_from([1, 3, 8, 16, 60, 128, 256]),
       k=st.integers(1, 8), renorm=st.booleans(), replay=st.booleans(),
       dtype=st.sampled_from(FLOATS), seed=seeds)
def test_route_matches_reference(device, t, e, k, renorm, replay, dtype, seed):
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    logits = _logits(g, t, e, dtype, device)
    forced = _forced(g, t, e, k, device) if replay else None
    w, ids = tse.moe_route(logits, k, renorm, forced)
    rw, rids = ref.moe_route(logits, k, renorm, forced)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.cpu(), rids.cpu())
    assert torch.allclose(w.double().cpu(), rw.cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_route_ties_go_to_lower_expert(device):
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0]], device=device)
    _, ids = tse.moe_route(logits, 3, True)
    assert ids.tolist() == [[1, 2, 3], [0, 1, 2]]


@pytest.mark.parametrize("device", DEVICES)
def test_route_matches_torch_topk(device):
    """HF's order (torch.topk of the fp32 softmax) on tie-free inputs."""
    g = torch.Generator().manual_seed(0)
    logits = _logits(g, 300, 128, torch.float32, device)
    w, ids = tse.moe_route(logits, 8, False)
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    top_w, top_ids = torch.topk(probs, 8, dim=-1)
    assert torch.equal(ids.long(), top_ids)
    torch.testing.assert_close(w, top_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, **SETTINGS)
@given(t=st.integers(0, 200), e=st.sampled_from([1, 2, 7, 32, 128, 256]),
       k=st.integers(1, 8), skew=st.booleans(), seed=seeds)
def test_dispatch_matches_reference(device, t, e, k, skew, seed):
    """Exact, including empty experts and experts holding most pairs (skew)."""
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    pool = min(e, k + 1) if skew else e  # skew: all pairs among a few experts
    ids = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(t)]) \
        if t else torch.empty(0, k, dtype=torch.long)
    ids = ids.to(torch.int32).to(device)
    got = tse.moe_dispatch(ids, e)
    want = ref.moe_dispatch(ids, e)
    for a, b in zip(got, want):
        assert a.dtype == torch.int32 and torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, **SETTINGS)
@given(t=st.integers(0, 40), h=st.sampled_from([1, 7, 64, 130]), k=st.integers(1, 8),
       dtype=st.sampled_from(FLOATS), seed=seeds)
def test_combine_matches_reference(device, t, h, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(t * k, h, generator=g).to(dtype).to(device)
    rows = torch.randperm(t * k, generator=g).to(torch.int32).to(device)
    w = torch.rand(t, k, generator=g).to(device)
    out = tse.moe_combine(y, rows, w)
    assert out.dtype == dtype and out.shape == (t, h)
    exact = ref.moe_combine(y, rows, w)
    own = (y[rows.long()].view(t, k, h) * w[:, :, None].to(dtype)).sum(1)
    assert_within_own_error(out, exact, own, what="moe_combine")


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=15, **SETTINGS)
@given(t=st.integers(0, 50), e=st.sampled_from([4, 16, 64]), k=st.integers(1, 4),
       dtype=st.sampled_from(FLOATS), invariant=st.booleans(), seed=seeds)
def test_experts_match_reference(device, t, e, k, dtype, invariant, seed):
    """dispatch + grouped GEMMs + SiLU-and-mul + combine, as the layer runs them (built
    batch-invariant: through grouped_gemm)."""
    k = min(k, e)
    h, inter = 64, 32
    g = torch.Generator().manual_seed(seed)
    with building_batch_invariant(invariant):
        layer = FusedExperts(e, h, inter).to(device)
    with torch.no_grad():
        layer.gate_up_proj.copy_(torch.randn(e, 2 * inter, h, generator=g) * 0.2)
        layer.down_proj.copy_(torch.randn(e, h, inter, generator=g) * 0.2)
    layer = layer.to(dtype)
    x = torch.randn(t, h, generator=g).to(dtype).to(device)
    w, ids = tse.moe_route(_logits(g, t, e, torch.float32, device), k, True)
    out = layer(x, ids, w)
    exact = ref.moe_experts(x, layer.gate_up_proj, layer.down_proj, ids, w)
    own = ref.moe_experts(x, layer.gate_up_proj, layer.down_proj, ids, w, dtype=dtype)
    assert_within_own_error(out, exact, own, factor=8.0, floor=1e-5, what="experts")


def _grouped_inputs(g, counts, n, k, dtype, device, offsets_dtype=torch.int64):
    """x [sum(counts), k], weight [E, n, k] (scaled so products stay O(1)), offsets."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    x = torch.randn(int(offsets[-1]), k, generator=g).to(dtype).to(device)
    w = (torch.randn(len(counts), n, k, generator=g) / max(k, 1) ** 0.5).to(dtype).to(device)
    return x, w, offsets.to(offsets_dtype).to(device)


def _random_counts(g, e, most):
    """Rows per expert: about a third of the experts empty, the others 1..most."""
    counts = torch.randint(1, most + 1, (e,), generator=g)
    return (counts * (torch.rand(e, generator=g) > 0.33)).tolist()


def _per_expert_mm(x, w, offsets):
    """PyTorch's own product at the input dtype, expert by expert."""
    b = offsets.tolist()
    return torch.cat([x[b[e]:b[e + 1]] @ w[e].t() for e in range(w.shape[0])]) \
        if x.shape[0] else x.new_empty(0, w.shape[1])


# K values: below one mma step, whole and partial 32-column steps, and K % 8 != 0 (which
# takes the FMA path on CUDA for 16-bit inputs too)
GEMM_K = [1, 8, 20, 32, 72, 136]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, **SETTINGS)
@given(e=st.sampled_from([1, 2, 5, 16]), most=st.sampled_from([1, 9, 70, 300]),
       n=st.sampled_from([1, 7, 64, 130]), k=st.sampled_from(GEMM_K),
       dtype=st.sampled_from(FLOATS), offsets_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=seeds)
def test_grouped_gemm_matches_reference(device, e, most, n, k, dtype, offsets_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, offsets = _grouped_inputs(g, _random_counts(g, e, most), n, k, dtype, device,
                                    offsets_dtype)
    out = tse.grouped_gemm(x, w, offsets)
    assert out.dtype == dtype and out.shape == (x.shape[0], n) and out.device == x.device
    exact = ref.grouped_gemm(x, w, offsets)
    assert_within_own_error(out, exact, _per_expert_mm(x, w, offsets), factor=4.0, floor=1e-6,
                            what="grouped_gemm")


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, **SETTINGS)
@given(e=st.sampled_from([1, 3, 8]), most=st.sampled_from([4, 40, 300]),
       n=st.sampled_from([5, 64, 136]), k=st.sampled_from(GEMM_K[1:]),
       dtype=st.sampled_from(FLOATS), seed=seeds, data=st.data())
def test_grouped_gemm_is_batch_invariant(device, e, most, n, k, dtype, seed, data):
    """A row's output is bitwise the same computed alone and among other rows of its
    expert and of the others, at any place in its expert's rows (on CUDA: at any place in
    a tile, in any of several tiles)."""
    g = torch.Generator().manual_seed(seed)
    counts = _random_counts(g, e, most)
    expert = data.draw(st.integers(0, e - 1))
    counts[expert] = max(counts[expert], 1)
    x, w, offsets = _grouped_inputs(g, counts, n, k, dtype, device)
    start = int(offsets[expert])
    row = start + data.draw(st.integers(0, counts[expert] - 1))
    alone_offsets = torch.zeros(e + 1, dtype=torch.int64, device=device)
    alone_offsets[expert + 1:] = 1
    alone = tse.grouped_gemm(x[row:row + 1], w, alone_offsets)
    assert torch.equal(tse.grouped_gemm(x, w, offsets)[row], alone[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sanitized_dtypes(*FLOATS))
def test_grouped_gemm_cuda(dtype):
    """Both CUDA paths (tensor cores at K = 72, FMA at K = 20 for 16-bit inputs) on tiles
    that end inside an expert, a K step and N; offsets int32 and int64; unchecked offsets
    out of order or past M write only inside the output."""
    g = torch.Generator().manual_seed(4)
    counts = [0, 130, 3, 0, 200]
    for k in (72, 20):
        for offsets_dtype in (torch.int32, torch.int64):
            x, w, offsets = _grouped_inputs(g, counts, 136, k, dtype, DEV, offsets_dtype)
            out = tse.grouped_gemm(x, w, offsets)
            assert_within_own_error(out, ref.grouped_gemm(x, w, offsets),
                                    _per_expert_mm(x, w, offsets), factor=4.0, floor=1e-6,
                                    what=f"grouped_gemm cuda K={k}")
        bad = torch.tensor([-5, 200, 100, 400, 300, 1000], device=DEV)
        tse.grouped_gemm(x, w, bad, validate=False)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_grouped_linear_matches_loop(dtype):
    """torch._grouped_mm (bf16 on sm_90) and the per-expert loop agree."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([0, 5, 130, 0, 17, 1, 64, 0])
    offsets = torch.zeros(9, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    x = torch.randn(int(counts.sum()), 256, generator=g).to(dtype).cuda()
    w = (torch.randn(8, 192, 256, generator=g) * 0.1).to(dtype).cuda()
    out = grouped_linear(x, w, offsets.cuda())
    want = torch.cat([x[a:b].double() @ w[e].double().t() for e, (a, b) in
                      enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])
    own = torch.cat([x[a:b] @ w[e].t() for e, (a, b) in
                     enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])
    assert_within_own_error(out, want, own, factor=4.0, floor=1e-5, what="grouped_linear")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sanitized_dtypes(*FLOATS))
def test_cuda_matches_cpu(dtype):
    """The CUDA kernels give the CPU kernels' ids, rows and offsets exactly (a block per
    expert, empty experts, a mixed replay batch), weights and sums within fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    t, e, k, h = 37, 60, 6, 72
    logits = _logits(g, t, e, dtype, "cpu")
    forced = _forced(g, t, e, k, "cpu")
    w, ids = tse.moe_route(logits, k, True, forced)
    wc, idsc = tse.moe_route(logits.cuda(), k, True, forced.cuda())
    assert torch.equal(idsc.cpu(), ids)
    torch.testing.assert_close(wc.cpu(), w, rtol=2e-6, atol=1e-7)
    for a, b in zip(tse.moe_dispatch(idsc, e), tse.moe_dispatch(ids, e)):
        assert torch.equal(a.cpu(), b)
    _, _, rows = tse.moe_dispatch(ids, e)
    y = torch.randn(t * k, h, generator=g).to(dtype)
    out = tse.moe_combine(y.cuda(), rows.cuda(), w.cuda())
    exact = ref.moe_combine(y, rows, w)
    assert_within_own_error(out, exact, tse.moe_combine(y, rows, w), factor=2.0,
                            what="moe_combine cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(1)
    logits = _logits(g, 9, 16, torch.float32, device)
    forced = _forced(g, 9, 16, 4, device)
    ids = tse.moe_route(logits, 4, True)[1]
    _, _, rows = tse.moe_dispatch(ids, 16)
    y = torch.randn(36, 24, generator=g).to(device)
    w = torch.rand(9, 4, generator=g).to(device)
    for op, args in [(torch.ops.tokenspeed.moe_route, (logits, 4, True, forced, True)),
                     (torch.ops.tokenspeed.moe_route, (logits, 4, False, None, False)),
                     (torch.ops.tokenspeed.moe_dispatch, (ids, 16, True)),
                     (torch.ops.tokenspeed.moe_combine, (y, rows, w))]:
        torch.library.opcheck(op, args)
    x, weight, offsets = _grouped_inputs(g, [3, 0, 7], 10, 16, torch.float32, device)
    for args in [(x, weight, offsets, True), (x, weight, offsets.int(), False)]:
        torch.library.opcheck(torch.ops.tokenspeed.grouped_gemm, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_fullgraph(device):
    def step(logits, forced, weight):
        w, ids = tse.moe_route(logits, 2, True, forced, validate=False)
        offsets, tokens, rows = tse.moe_dispatch(ids, logits.shape[1], validate=False)
        y = tse.grouped_gemm(logits.index_select(0, tokens), weight, offsets, validate=False)
        return tse.moe_combine(y, rows, w)

    g = torch.Generator().manual_seed(2)
    logits = _logits(g, 11, 8, torch.float32, device)
    forced = _forced(g, 11, 8, 2, device)
    weight = torch.randn(8, 5, 8, generator=g).to(device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, forced, weight), step(logits, forced, weight))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    logits = torch.randn(4, 8, device=device)
    ids = torch.zeros(4, 2, dtype=torch.int32, device=device)
    meta = torch.empty(4, 2, dtype=torch.int32, device="meta")
    bad_forced = torch.tensor([[0, 9]] * 4, dtype=torch.int32, device=device)
    half_forced = torch.tensor([[0, -1]] * 4, dtype=torch.int32, device=device)
    assert_each_raises([
        (lambda: tse.moe_route(logits, 9, True), "top_k must be in"),
        (lambda: tse.moe_route(logits, 0, True), "top_k must be in"),
        (lambda: tse.moe_route(logits.t(), 2, True), "contiguous along the experts"),
        (lambda: tse.moe_route(logits.long(), 2, True), "logits must be float32"),
        (lambda: tse.moe_route(logits, 2, True, bad_forced), r"forced\[0, 1\] is 9"),
        (lambda: tse.moe_route(logits, 2, True, half_forced), r"forced\[0, 1\] is -1"),
        (lambda: tse.moe_route(logits, 2, True, ids.long()), "forced must be int32"),
        (lambda: tse.moe_route(logits, 3, True, ids), r"forced must be \[T, top_k\]"),
        (lambda: tse.moe_dispatch(ids.long(), 8), "ids must be int32"),
        (lambda: tse.moe_dispatch(ids + 8, 8), r"ids must lie in \[0, 8\)"),
        (lambda: tse.moe_dispatch(ids, 0), "num_experts must be in"),
        (lambda: tse.moe_combine(torch.randn(7, 3, device=device), ids.view(-1),
                                 torch.rand(4, 2, device=device)), "pair_rows must be|rows"),
        (lambda: tse.moe_combine(torch.randn(8, 3, device=device), ids.view(-1),
                                 torch.rand(4, 2, device=device).double()),
         "weights must be float32"),
        (lambda: tse.moe_combine(torch.randn(8, 3, device=device), meta.view(-1),
                                 torch.rand(4, 2, device=device)), "is on"),
    ])
    x = torch.randn(5, 6, device=device)
    weight = torch.randn(3, 4, 6, device=device)
    offsets = torch.tensor([0, 2, 2, 5], device=device)

    def gemm(x=x, weight=weight, offsets=offsets):
        return tse.grouped_gemm(x, weight, offsets)
    assert_each_raises([
        (lambda: gemm(x=x.long()), "x must be float32"),
        (lambda: gemm(x=x[0]), r"x must be 2-D \[M, K\]"),
        (lambda: gemm(weight=weight.half()), "weight must have x's dtype"),
        (lambda: gemm(weight=weight[:, :, :5]), r"weight must be \[E, N, K\] with K = 6"),
        (lambda: gemm(offsets=offsets.float()), "offsets must be int32 or int64"),
        (lambda: gemm(offsets=offsets[:3]), r"offsets must be \[E \+ 1\] = \[4\]"),
        (lambda: gemm(offsets=offsets + 1), r"offsets\[0\] must be 0, got 1"),
        (lambda: gemm(offsets=torch.tensor([0, 3, 1, 5], device=device)),
         r"non-decreasing, got offsets\[2\] = 1 < offsets\[1\] = 3"),
        (lambda: gemm(offsets=offsets.clamp(max=4)), r"offsets\[E\] must equal x's rows M = 5"),
        (lambda: gemm(weight=weight.to("meta")), "is on"),
    ])
