"""The log-prob head (LM head + fused op) against an fp64 log_softmax of the same weights."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from tokenspeed.layers.gemm import building_batch_invariant
from tokenspeed.layers.logprob_head import HeadOptions, LogprobHead, head_logits

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
    come with it: on CUDA the fused op (its kernel for bf16, its fallback for fp32) or the
    logits path, on the CPU the logits path, each on fixed row blocks (2048 rows on CUDA,
    so some slices below span two blocks)."""
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
