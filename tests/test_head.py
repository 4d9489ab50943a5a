"""The log-prob head (LM head + fused op) against an fp64 log_softmax of the same weights."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from tokenspeed.layers.gemm import building_batch_invariant
from tokenspeed.layers.logprob_head import HeadOptions, LogprobHead, head_logits
from tokenspeed.layers.sampler_filters import RowOptions, candidate_count

VOCAB, HIDDEN = 1000, 64


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, t: float):
    logp = torch.log_softmax(hidden.double() @ weight.double().T / t, -1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab_chunk", [None, 300])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("fused", [True, False])
def test_head_matches_fp64(device, dtype, vocab_chunk, temperature, fused):
    """On CUDA a bf16/fp16 head keeps its GEMM's fp32 accumulator (fused: the partials
    taken in the GEMM's epilogue; else written as fp32 logits), so it scores as exactly as
    an fp32 head of the same weights; rounding the logits to bf16 would cost about
    |logit| / T * 2^-9 (~0.02 here) and fail the bound. The CPU has no such GEMM and
    rounds the logits to the input dtype (fused changes nothing there)."""
    gen = torch.Generator().manual_seed(hash((dtype, vocab_chunk, temperature)) % 2**31)
    rows = 97
    head = LogprobHead(VOCAB, HIDDEN, options=HeadOptions(vocab_chunk=vocab_chunk,
                                                         fused=fused)).to(
        device=device, dtype=dtype)
    head.weight.data.copy_(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5)
    hidden = torch.randn(rows, HIDDEN, generator=gen).to(device=device, dtype=dtype)
    targets = torch.randint(0, VOCAB, (rows,), generator=gen).to(device)
    lp, ent = head(hidden, targets, temperature, True)
    ref_lp, ref_ent = _reference(hidden.cpu(), head.weight.cpu(), targets.cpu(), temperature)
    assert lp.dtype == ent.dtype == torch.float32
    exact = dtype == torch.float32 or device == "cuda"
    tol = 1e-4 if exact else (2**-7 if dtype == torch.bfloat16 else 2**-10) * 4 * 8 / temperature
    assert (lp.cpu().double() - ref_lp).abs().max() < tol
    assert (ent.cpu().double() - ref_ent).abs().max() < tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_invariant_head_rows_do_not_depend_on_the_batch(device, dtype, fused):
    """Built in batch-invariant mode, the head scores a row bitwise alike whatever rows
    come with it: on CUDA the fused op asked for batch invariance (its kernel for bf16,
    its fallback for fp32, which pads its row blocks) or the logits path, on the CPU the
    logits path, on fixed row blocks (2048 rows on CUDA, so some slices below span two
    blocks)."""
    gen = torch.Generator().manual_seed(hash((dtype, fused)) % 2**31)
    rows = 2500
    with building_batch_invariant(True):
        head = LogprobHead(VOCAB, HIDDEN, options=HeadOptions(fused=fused)).to(
            device=device, dtype=dtype)
    head.weight.data.copy_(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5)
    hidden = torch.randn(rows, HIDDEN, generator=gen).to(device=device, dtype=dtype)
    targets = torch.randint(0, VOCAB, (rows,), generator=gen).to(device)
    lp, ent = head(hidden, targets, 0.8, True)
    for a, b in [(0, 1), (5, 133), (17, 18), (2047, 2049), (100, 2500), (1999, 2300)]:
        part_lp, part_ent = head(hidden[a:b].clone(), targets[a:b], 0.8, True)
        assert torch.equal(part_lp, lp[a:b]) and torch.equal(part_ent, ent[a:b]), (a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_head_logits_dtype(device):
    hidden = torch.randn(5, HIDDEN, device=device, dtype=torch.bfloat16)
    weight = torch.randn(7, HIDDEN, device=device, dtype=torch.bfloat16)
    logits = head_logits(hidden, weight)
    assert logits.dtype == (torch.float32 if device == "cuda" else torch.bfloat16)
    torch.testing.assert_close(logits.float(), (hidden.float() @ weight.float().T),
                               atol=1e-3 if device == "cuda" else 0.1, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_rich_pass_takes_only_the_rich_rows(device, monkeypatch):
    """forward_rich over plain and rich rows: the rich pass sees the rich rows alone and
    scores them as it does without the plain ones; the plain rows score as forward scores
    them, with placeholder extras (-inf); a batch whose rows are all plain (it asks ids,
    but none of its rows has any) runs no rich pass."""
    gen = torch.Generator().manual_seed(21)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    head = LogprobHead(VOCAB, HIDDEN).to(device=device, dtype=dtype)
    head.weight.data.copy_(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5)
    rows = 40
    hidden = torch.randn(rows, HIDDEN, generator=gen).to(device=device, dtype=dtype)
    targets = torch.randint(0, VOCAB, (rows,), generator=gen).to(device)
    rich = torch.randperm(rows, generator=gen)[:15].sort().values
    plain = torch.tensor([r for r in range(rows) if r not in set(rich.tolist())])
    top_k = torch.zeros(rows, dtype=torch.int64)
    top_k[rich] = 5
    token_ids = torch.full((rows, 2), -1, dtype=torch.int64)
    token_ids[rich] = torch.randint(0, VOCAB, (len(rich), 2), generator=gen)

    def options(ids: torch.Tensor, plain_rows, rich_rows) -> RowOptions:
        return RowOptions(top_k.to(device), torch.ones(rows, device=device),
                          torch.zeros(rows, device=device), 0, ids.to(device),
                          candidate_count(0, 5, False), True,
                          None if plain_rows is None else plain_rows.to(device),
                          None if rich_rows is None else rich_rows.to(device))
    seen, rich_rows = [], head._rich_rows
    monkeypatch.setattr(head, "_rich_rows",
                        lambda h, *args: seen.append(h.shape[0]) or rich_rows(h, *args))
    opts = options(token_ids, plain, rich)
    out = head.forward_rich(hidden, targets, 0.9, opts)
    assert seen == [len(rich)]
    d_rich, d_plain = rich.to(device), plain.to(device)
    alone = rich_rows(hidden[d_rich], targets[d_rich], 0.9, opts.take(d_rich))
    assert torch.equal(out.log_probs[d_rich], alone.log_probs)
    assert torch.equal(out.entropy[d_rich], alone.entropy)
    assert torch.equal(out.token_logprobs[d_rich], alone.token_logprobs)
    lp, ent = head(hidden[d_plain], targets[d_plain], 0.9, True)
    assert torch.equal(out.log_probs[d_plain], lp) and torch.equal(out.entropy[d_plain], ent)
    assert torch.isneginf(out.token_logprobs[d_plain]).all()

    seen.clear()
    none = torch.full((rows, 2), -1, dtype=torch.int64)
    out = head.forward_rich(hidden, targets, 0.9, options(none, torch.arange(rows), None))
    assert seen == [] and torch.isneginf(out.token_logprobs).all()
    lp, ent = head(hidden, targets, 0.9, True)
    assert torch.equal(out.log_probs, lp) and torch.equal(out.entropy, ent)
