"""Padded layouts (score_padded, score_responses) against HF's own padded forward, device
tensors (return_tensors, pad_to), device ids read back once, weight_version in results."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import load_hf, make_checkpoint

from tokenspeed import Engine

pytest.importorskip("transformers")
TOL = 1e-4
VOCAB = 89
PAD = VOCAB + 5  # out of the vocabulary: a pad id that were scored would be an error
PROPERTY = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("p"), "Qwen2ForCausalLM", vocab=VOCAB,
                           seed=5)
    with Engine(path, device="cpu", dtype="float32", kv_cache_tokens=2048) as engine:
        yield engine, load_hf(path)


def padded_batch(gen: torch.Generator, rows: list[tuple[int, int, int]], left: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt length, response length, padding) per row -> ids, attention and response
    masks [B, L], the padding on the left or the right of each row."""
    width = max(p + r + pad for p, r, pad in rows)
    ids = torch.full((len(rows), width), PAD)
    attn = torch.zeros(len(rows), width, dtype=torch.int64)
    resp = torch.zeros(len(rows), width, dtype=torch.int64)
    for b, (p, r, _) in enumerate(rows):
        start = width - p - r if left else 0
        ids[b, start:start + p + r] = torch.randint(0, VOCAB, (p + r,), generator=gen)
        attn[b, start:start + p + r] = 1
        resp[b, start + p:start + p + r] = 1
    return ids, attn, resp


@torch.no_grad()
def hf_padded(hf, ids: torch.Tensor, attn: torch.Tensor, resp: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's padded forward, position_ids from the mask: log p and entropy [B, L] of each
    response token given the attended token before it (every row here is unbroken)."""
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    logits = hf(input_ids=ids.clamp(max=VOCAB - 1), attention_mask=attn,
                position_ids=position_ids).logits.double()
    logp = torch.log_softmax(logits, -1)
    lp = torch.zeros(ids.shape, dtype=torch.float64)
    ent = torch.zeros(ids.shape, dtype=torch.float64)
    target = ids[:, 1:].clamp(max=VOCAB - 1)
    lp[:, 1:] = logp[:, :-1].gather(-1, target[..., None])[..., 0]
    ent[:, 1:] = -(logp.exp() * logp).sum(-1)[:, :-1]
    return lp * resp, ent * resp


rows_strategy = st.lists(st.tuples(st.integers(1, 12), st.integers(0, 9), st.integers(0, 7)),
                         min_size=1, max_size=5)


@PROPERTY
@given(rows=rows_strategy, left=st.booleans(), seed=st.integers(0, 2**31 - 1),
       mask_dtype=st.sampled_from([torch.bool, torch.int64, torch.float32]))
def test_score_padded_matches_hf_padded_forward(model, rows, left, seed, mask_dtype):
    engine, hf = model
    ids, attn, resp = padded_batch(torch.Generator().manual_seed(seed), rows, left)
    out = engine.score_padded(ids, attn.to(mask_dtype), resp.to(mask_dtype),
                              return_entropy=True)
    ref_lp, ref_ent = hf_padded(hf, ids, attn, resp)
    assert out["log_probs"].shape == ids.shape and out["log_probs"].dtype == torch.float32
    assert (out["log_probs"][resp == 0] == 0).all() and (out["entropy"][resp == 0] == 0).all()
    assert (out["log_probs"].double() - ref_lp).abs().max() <= TOL
    assert (out["entropy"].double() - ref_ent).abs().max() <= TOL
    assert out["weight_version"] == engine.stats()["weight_version"]
    assert set(out) == {"log_probs", "entropy", "weight_version"}


@PROPERTY
@given(rows=rows_strategy, prompt_pad=st.integers(0, 4), response_pad=st.integers(0, 4),
       seed=st.integers(0, 2**31 - 1))
def test_score_responses_matches_score_padded(model, rows, prompt_pad, response_pad, seed):
    """Prompts left-padded to P, responses right-padded to R: the [B, R] scores are the
    joined layout's, and HF's."""
    engine, hf = model
    gen = torch.Generator().manual_seed(seed)
    width_p = max(p for p, _, _ in rows) + prompt_pad
    width_r = max(r for _, r, _ in rows) + response_pad + 1
    b = len(rows)
    prompt_ids, response_ids = torch.full((b, width_p), PAD), torch.full((b, width_r), PAD)
    prompt_mask = torch.zeros(b, width_p, dtype=torch.int64)
    response_mask = torch.zeros(b, width_r, dtype=torch.int64)
    for i, (p, r, _) in enumerate(rows):
        prompt_ids[i, width_p - p:] = torch.randint(0, VOCAB, (p,), generator=gen)
        prompt_mask[i, width_p - p:] = 1
        response_ids[i, :r] = torch.randint(0, VOCAB, (r,), generator=gen)
        response_mask[i, :r] = 1
    out = engine.score_responses(prompt_ids, prompt_mask, response_ids, response_mask)
    ids = torch.cat([prompt_ids, response_ids], 1)
    attn = torch.cat([prompt_mask, response_mask], 1)
    resp = torch.cat([torch.zeros_like(prompt_mask), response_mask], 1)
    ref_lp, _ = hf_padded(hf, ids, attn, resp)
    assert out["log_probs"].shape == (b, width_r)
    assert (out["log_probs"].double() - ref_lp[:, width_p:]).abs().max() <= TOL


def test_score_padded_equals_compute_log_probs_lists(model):
    """The padded layout is only a view: the same sequences as lists score the same."""
    engine, _ = model
    gen = torch.Generator().manual_seed(3)
    ids, attn, resp = padded_batch(gen, [(3, 4, 2), (5, 0, 1), (1, 6, 0)], left=True)
    out = engine.score_padded(ids, attn, resp)["log_probs"]
    lists = engine.compute_log_probs(
        [{"prompt_token_ids": ids[0, 2:5], "completion_token_ids": ids[0, 5:9]},
         {"prompt_token_ids": ids[2, 2:3], "completion_token_ids": ids[2, 3:9]}])["log_probs"]
    assert out[0, 5:9].tolist() == lists[0] and out[2, 3:9].tolist() == lists[1]
    assert (out[1] == 0).all()


@pytest.mark.parametrize("attn, resp, match", [
    ([[1, 1, 1, 0]], [[0, 1, 1, 1]], r"row 0: response token at position 3 is padding"),
    ([[1, 1, 1, 1, 1]], [[0, 1, 0, 1, 0]], r"row 0: the response has a gap at position 2"),
    ([[1, 1, 1, 1]], [[0, 1, 1, 0]], r"row 0: attended token at position 3 after the response"),
    ([[0, 1, 1, 1]], [[0, 1, 1, 1]], r"row 0: the response starts at position 1 with no "
                                     r"attended prompt"),
    ([[1, 1, 1, 1], [1, 1, 2, 1]], [[0, 0, 1, 1]] * 2, r"attention_mask\[1, 2\] is 2"),
    ([[1, 1, 1, 1]] * 3, [[0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]],
     r"row 2: the response has a gap at position 2; it must be one contiguous run of "
     r"positions 1..3"),
    ([[1, 1, 1, 1]], [[0, 0, 1]], r"response_mask has shape \(1, 3\), input_ids \(1, 4\)"),
    ([[1, 1, 1, 1]], [[0, 0, 0.5, 1]], r"response_mask\[0, 2\] is 0.5; masks hold 0 or 1"),
])
def test_malformed_masks_are_rejected_naming_the_row(model, attn, resp, match):
    engine, _ = model
    before = engine.stats()
    ids = torch.randint(0, VOCAB, (len(attn), len(attn[0])))
    with pytest.raises(ValueError, match=match):
        engine.score_padded(ids, torch.tensor(attn), torch.tensor(resp))
    assert engine.stats() == before


def test_return_tensors_are_on_the_engine_device_and_pad_to(model):
    engine, _ = model
    seqs = [{"prompt_token_ids": [1, 2], "completion_token_ids": [3, 4, 5]},
            {"prompt_token_ids": [6], "completion_token_ids": []},
            {"prompt_token_ids": [7], "completion_token_ids": [8]}]
    lists = engine.compute_log_probs(seqs)
    out = engine.compute_log_probs(seqs, return_tensors=True, pad_to=6)
    assert out["log_probs"].shape == out["tokens"].shape == out["mask"].shape == (3, 6)
    assert out["mask"].sum(1).tolist() == [3, 0, 1]
    assert [row[m].tolist() for row, m in zip(out["log_probs"], out["mask"])] == lists["log_probs"]
    assert (out["log_probs"][~out["mask"]] == 0).all()
    assert out["weight_version"] == lists["weight_version"] == engine.stats()["weight_version"]
    with pytest.raises(ValueError, match="pad_to is 2, but the longest completion has 3"):
        engine.compute_log_probs(seqs, return_tensors=True, pad_to=2)
    with pytest.raises(ValueError, match="pass return_tensors=True"):
        engine.compute_log_probs(seqs, pad_to=6)


@pytest.mark.gpu
def test_device_results_and_ids_read_back_once(tmp_path, monkeypatch):
    """CUDA ids in, CUDA scores out: one read-back of the ids per call, and score_padded's
    result equals the list result."""
    device = "cuda"
    path = make_checkpoint(tmp_path, "LlamaForCausalLM", vocab=VOCAB, seed=9)
    with Engine(path, device=device, dtype="float32", kv_cache_tokens=1024) as engine:
        gen = torch.Generator().manual_seed(0)
        ids, attn, resp = padded_batch(gen, [(4, 5, 1), (2, 3, 4), (6, 1, 0)], left=False)
        reads = []
        real_cpu = torch.Tensor.cpu

        def counted(t, *a, **k):
            reads.append(t.device)
            return real_cpu(t, *a, **k)
        monkeypatch.setattr(torch.Tensor, "cpu", counted)
        out = engine.score_padded(ids.to(device), attn.to(device), resp.to(device))
        seqs = [{"prompt_token_ids": torch.tensor([1, 2, 3], device=device),
                 "completion_token_ids": torch.tensor([4, 5], device=device)}] * 3
        tensors = engine.compute_log_probs(seqs, return_tensors=True)
        monkeypatch.undo()
        assert [d.type for d in reads if d.type != "cpu"] == [device, device]
        assert out["log_probs"].device.type == tensors["log_probs"].device.type == device
        lists = engine.compute_log_probs(
            [{"prompt_token_ids": ids[b][(attn[b] == 1) & (resp[b] == 0)],
              "completion_token_ids": ids[b][resp[b] == 1]} for b in range(3)])["log_probs"]
        assert [out["log_probs"][b][resp[b].to(device) == 1].tolist() for b in range(3)] == lists


@pytest.mark.gpu
def test_return_tensors_call_never_waits_for_the_device(tmp_path):
    """With device outputs nothing in the call synchronises with the GPU, the final copy
    and padding included (torch's sync debug mode turns any wait into an error). Head dim
    64 in bf16 takes the attention kernel that needs no host copy of the lengths."""
    path = make_checkpoint(tmp_path, "LlamaForCausalLM", vocab=VOCAB, hidden=256, heads=4,
                           kv_heads=2, seed=13)
    gen = torch.Generator().manual_seed(2)
    seqs = [{"prompt_token_ids": torch.randint(0, VOCAB, (int(p),), generator=gen).tolist(),
             "completion_token_ids": torch.randint(0, VOCAB, (int(c),), generator=gen).tolist()}
            for p, c in torch.randint(1, 40, (24, 2), generator=gen)]
    with Engine(path, device="cuda", dtype="bfloat16", max_batch_tokens=64,
                kv_cache_tokens=8192) as engine:
        lists = engine.compute_log_probs(seqs, return_entropy=True)
        engine.shard.scheduler.flush()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = engine.compute_log_probs(seqs, return_entropy=True, return_tensors=True,
                                           pad_to=48)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert out["log_probs"].shape == (24, 48) and out["log_probs"].is_cuda
        assert [row[m].tolist() for row, m in zip(out["log_probs"], out["mask"])] \
            == lists["log_probs"]
