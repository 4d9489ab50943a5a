"""Tensor parallelism of MoE models on gloo (2 CPU ranks) against tp_size 1: every rank
holds every expert's slice of the intermediate dimension, so routing is computed
identically on every rank; scores, captured routing and replay match tp_size 1."""
from __future__ import annotations

import pytest
import torch
from model_factory import MOE_ARCHS, max_abs_diff
from test_moe_models import grpo_sequences, moe_checkpoint
from test_moe_routing import random_routing

from tokenspeed import Engine

pytest.importorskip("transformers")
SETTINGS = dict(device="cpu", dtype="float32", page_size=4, max_batch_tokens=16,
                kv_cache_tokens=512)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_tp2_matches_tp1(tmp_path, arch):
    path = moe_checkpoint(tmp_path, arch, seed=8, heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(8)
    seqs = grpo_sequences(gen, 257, groups=2, size=3)
    with Engine(path, **SETTINGS) as one:
        want = [one.compute_log_probs(seqs, return_routed_experts=True) for _ in range(2)]
        layers = one.model_config.moe
        forced = [dict(s, routed_experts=random_routing(
            gen, len(s["prompt_token_ids"]) + len(s["completion_token_ids"]) - 1,
            len(layers.sparse_layers), layers.num_experts, layers.top_k)) for s in seqs]
        want_forced = one.compute_log_probs(forced)
    with Engine(path, tp_size=2, **SETTINGS) as two:
        got = [two.compute_log_probs(seqs, return_routed_experts=True) for _ in range(2)]
        got_forced = two.compute_log_probs(forced)
        assert two.stats()["prefix_hit_tokens"] > 0
    for g, w in zip(got, want):
        assert max_abs_diff(g["log_probs"], w["log_probs"]) <= 1e-5
        assert g["routed_experts"] == w["routed_experts"]
    assert max_abs_diff(got_forced["log_probs"], want_forced["log_probs"]) <= 1e-5


def test_tp_refuses_unsplittable_experts(tmp_path):
    from model_factory import make_checkpoint
    from test_moe_models import MOE
    path = make_checkpoint(tmp_path, "Qwen3MoeForCausalLM", layers=3,
                           moe=dict(MOE["Qwen3MoeForCausalLM"], moe_intermediate_size=25))
    with pytest.raises(ValueError, match="experts' intermediate_size 25"):
        Engine(path, tp_size=2, **SETTINGS)
