"""Routing capture and replay on MoE models (CPU fp32 against HF transformers): captured
routing is HF's own top-k of its router logits, for computed and prefix-cached tokens
alike; replaying HF's routing reproduces HF's scores; a forced routing scores as a run
without any prefix cache under the same routing, with and without prefix hits and in
batches mixed with free sequences; bad routing is refused, naming the sequence."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from model_factory import MOE_ARCHS, hf_scores, load_hf, max_abs_diff, random_sequences
from test_moe_models import MOE, grpo_sequences, moe_checkpoint

from tokenspeed import Engine
from tokenspeed.inputs import InvalidSequenceError

pytest.importorskip("transformers")
TOL = 1e-4
VOCAB = 257


def engine(path, device="cpu", **kw):
    kw.setdefault("kv_cache_tokens", 2048)
    return Engine(path, device=device, dtype="float32", page_size=4, max_batch_tokens=23, **kw)


@torch.no_grad()
def hf_routing(hf, seq: dict, top_k: int) -> torch.Tensor:
    """[len - 1, L, k]: HF's top-k of its fp32 router probabilities, largest first."""
    ids = torch.tensor([seq["prompt_token_ids"] + seq["completion_token_ids"]])
    logits = hf(ids, output_router_logits=True).router_logits
    return torch.stack([torch.topk(torch.softmax(l.float(), -1), top_k).indices
                        for l in logits], 1)[:-1].to(torch.int32)


def random_routing(gen: torch.Generator, length: int, layers: int, experts: int,
                   top_k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(experts, generator=gen)[:top_k]
                        for _ in range(length * layers)]).view(length, layers, top_k).int()


def moe_shape(arch: str) -> tuple[int, int, int]:
    """(sparse layers, experts, top_k) of the test checkpoints."""
    cfg = MOE[arch]
    layers = {"Qwen3MoeForCausalLM": 2, "Qwen2MoeForCausalLM": 1, "MixtralForCausalLM": 3}[arch]
    return layers, cfg["num_experts"], cfg["num_experts_per_tok"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_capture_is_hf_topk(tmp_path, arch, device):
    path = moe_checkpoint(tmp_path, arch, seed=3)
    hf = load_hf(path)
    gen = torch.Generator().manual_seed(2)
    seqs = grpo_sequences(gen, VOCAB) + random_sequences(gen, VOCAB, 3, max_prompt=20)
    seqs.append({"prompt_token_ids": [5, 6, 7, 8, 9], "completion_token_ids": []})
    top_k = moe_shape(arch)[2]
    want = [hf_routing(hf, s, top_k) for s in seqs]
    with engine(path, device) as e:
        first = e.compute_log_probs(seqs, return_routed_experts=True)
        hits = e.stats()["prefix_hit_tokens"]
        again = e.compute_log_probs(seqs, return_routed_experts=True, return_tensors=True)
        assert e.stats()["prefix_hit_tokens"] > hits  # the second call read cached pages
    # tensors come back on the engine's device
    assert again["routed_experts"].device.type == device
    again = {"routed_experts": again["routed_experts"].cpu()}
    for i, w in enumerate(want):
        assert torch.equal(torch.tensor(first["routed_experts"][i], dtype=torch.int32)
                           .view(w.shape), w), i
        assert torch.equal(again["routed_experts"][i, :len(w)], w), i
        assert (again["routed_experts"][i, len(w):] == -1).all()


def test_capture_enabled_later_flushes_cache(tmp_path):
    """Pages cached before the first capture have no routing: they are not reused."""
    arch = "Qwen3MoeForCausalLM"
    path = moe_checkpoint(tmp_path, arch, seed=3)
    hf = load_hf(path)
    seqs = grpo_sequences(torch.Generator().manual_seed(3), VOCAB, groups=2)
    with engine(path) as e:
        e.compute_log_probs(seqs)
        out = e.compute_log_probs(seqs, return_routed_experts=True)
    for s, r in zip(seqs, out["routed_experts"]):
        assert torch.equal(torch.tensor(r, dtype=torch.int32), hf_routing(hf, s, 3))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_replaying_hf_routing_reproduces_hf(tmp_path, arch):
    path = moe_checkpoint(tmp_path, arch, seed=4)
    hf = load_hf(path)
    seqs = grpo_sequences(torch.Generator().manual_seed(4), VOCAB, groups=2)
    ref, _ = hf_scores(hf, seqs)
    replayed = [dict(s, routed_experts=hf_routing(hf, s, moe_shape(arch)[2])) for s in seqs]
    with engine(path) as e:
        out = e.compute_log_probs(replayed)
    assert max_abs_diff(out["log_probs"], ref) <= TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_forced_routing_equals_no_cache_run(tmp_path, arch, device):
    """A random valid routing, shared by the members of each GRPO group on their prompt
    (so they hit each other's pages), mixed with free sequences on the same prompts: with
    the prefix cache, every score equals the same sequence's score from an engine without
    any cache; free sequences still match HF, and never read replayed K/V."""
    path = moe_checkpoint(tmp_path, arch, seed=5)
    hf = load_hf(path)
    layers, experts, top_k = moe_shape(arch)
    gen = torch.Generator().manual_seed(5)
    seqs = grpo_sequences(gen, VOCAB, groups=2, size=4)
    prompt_routing = {}
    mixed = []
    for i, s in enumerate(seqs):
        if i % 4 == 3:
            mixed.append(s)  # a free member of the group
            continue
        p, n = len(s["prompt_token_ids"]), len(s["completion_token_ids"])
        key = tuple(s["prompt_token_ids"])
        if key not in prompt_routing:
            prompt_routing[key] = random_routing(gen, p, layers, experts, top_k)
        tail = random_routing(gen, n - 1, layers, experts, top_k)
        mixed.append(dict(s, routed_experts=torch.cat([prompt_routing[key], tail])))
    with engine(path, device, enable_prefix_cache=False) as e:
        alone = [e.compute_log_probs([s])["log_probs"][0] for s in mixed]
    with engine(path, device) as e:
        first = e.compute_log_probs(mixed, return_routed_experts=True)
        hits = e.stats()["prefix_hit_tokens"]
        second = e.compute_log_probs(mixed)
        assert hits > 0 and e.stats()["prefix_hit_tokens"] > hits
    assert max_abs_diff(first["log_probs"], alone) <= 1e-5
    assert max_abs_diff(second["log_probs"], alone) <= 1e-5
    free = [i for i, s in enumerate(mixed) if "routed_experts" not in s]
    ref, _ = hf_scores(hf, [mixed[i] for i in free])
    assert max_abs_diff([first["log_probs"][i] for i in free], ref) <= TOL
    for s, r in zip(mixed, first["routed_experts"]):  # capture reports the forced experts
        if "routed_experts" in s:
            assert torch.equal(torch.tensor(r, dtype=torch.int32), s["routed_experts"])
    # the forced routing matters: the replayed scores are not the free ones
    replayed = [i for i in range(len(mixed)) if i not in free]
    free_ref, _ = hf_scores(hf, [mixed[i] for i in replayed])
    assert max_abs_diff([first["log_probs"][i] for i in replayed], free_ref) > 1e-3


def test_bad_routing_is_refused(tmp_path):
    arch = "Qwen3MoeForCausalLM"
    path = moe_checkpoint(tmp_path, arch, seed=6)
    good = {"prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5]}
    ok = random_routing(torch.Generator().manual_seed(0), 4, 2, 12, 3)
    dup = ok.clone()
    dup[2, 1, 2] = dup[2, 1, 0]
    far = ok.clone()
    far[1, 0, 1] = 12
    cases = [(ok[:3], "shape"), (ok.float(), "integer"), (dup, r"\[2\]\[1\] names an expert twice"),
             (far, r"\[1\]\[0\]\[1\] is 12"), ("x", "routed_experts")]
    with engine(path) as e:
        for routing, pattern in cases:
            with pytest.raises(InvalidSequenceError, match=f"sequence 1: .*{pattern}") as info:
                e.compute_log_probs([good, dict(good, routed_experts=routing)])
            assert info.value.index == 1 and info.value.field == "routed_experts"
        assert e.stats()["scored_tokens"] == 0
        assert len(e.compute_log_probs([dict(good, routed_experts=ok)])["log_probs"][0]) == 2


def test_dense_model_refuses_routing(tmp_path):
    from model_factory import make_checkpoint
    path = make_checkpoint(tmp_path, "Qwen3ForCausalLM")
    seq = {"prompt_token_ids": [1, 2], "completion_token_ids": [3], "routed_experts": [[[0]]]}
    with Engine(path, kv_cache_tokens=64) as e:
        with pytest.raises(InvalidSequenceError, match="no mixture-of-experts"):
            e.compute_log_probs([seq])
        with pytest.raises(ValueError, match="return_routed_experts"):
            e.compute_log_probs([{"prompt_token_ids": [1], "completion_token_ids": [2]}],
                                return_routed_experts=True)
