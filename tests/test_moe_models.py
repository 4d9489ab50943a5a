"""MoE models (Qwen3-MoE, Qwen2-MoE, Mixtral) against HF transformers in fp32 on small
random checkpoints: both weight layouts, chunked prefill, prefix cache on and off, GRPO
groups, weight updates under either naming."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from model_factory import (MOE_ARCHS, hf_bf16_scores, hf_scores, load_hf, make_checkpoint,
                           max_abs_diff, mean_abs_diff, random_sequences)

from tokenspeed import Engine

pytest.importorskip("transformers")
TOL = 1e-4
# per architecture: experts, top-k and the dense layers of a 3-layer model
MOE = {"Qwen3MoeForCausalLM": dict(num_experts=12, num_experts_per_tok=3, norm_topk_prob=True,
                                   mlp_only_layers=[1]),
       "Qwen2MoeForCausalLM": dict(num_experts=16, num_experts_per_tok=4, decoder_sparse_step=2),
       "MixtralForCausalLM": dict(num_experts=8, num_experts_per_tok=2)}


def moe_checkpoint(path, arch, **kwargs):
    kwargs.setdefault("vocab", 257)
    return make_checkpoint(path, arch, layers=3, moe=MOE[arch], **kwargs)


def grpo_sequences(gen: torch.Generator, vocab: int, groups: int = 3, size: int = 4
                   ) -> list[dict]:
    """``groups`` prompts, each with ``size`` completions (RL's GRPO shape)."""
    out = []
    for _ in range(groups):
        prompt = torch.randint(0, vocab, (int(torch.randint(5, 30, (1,), generator=gen)),),
                               generator=gen).tolist()
        for _ in range(size):
            n = int(torch.randint(1, 12, (1,), generator=gen))
            out.append({"prompt_token_ids": prompt,
                        "completion_token_ids": torch.randint(0, vocab, (n,),
                                                              generator=gen).tolist()})
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_matches_hf_fp32(tmp_path, arch, device):
    path = moe_checkpoint(tmp_path, arch, seed=3)
    hf = load_hf(path)
    gen = torch.Generator().manual_seed(1)
    seqs = random_sequences(gen, 257, 5, max_prompt=24) + grpo_sequences(gen, 257)
    ref_lp, ref_ent = hf_scores(hf, seqs)
    for prefix_cache in (False, True):
        with Engine(path, device=device, dtype="float32", page_size=4, max_batch_tokens=17,
                    kv_cache_tokens=1024, enable_prefix_cache=prefix_cache) as engine:
            out = engine.compute_log_probs(seqs, return_entropy=True)
            again = engine.compute_log_probs(seqs)  # served from the cache when it is on
            hits = engine.stats()["prefix_hit_tokens"]
        assert (hits > 0) == prefix_cache
        assert max_abs_diff(out["log_probs"], ref_lp) <= TOL
        assert max_abs_diff(out["entropy"], ref_ent) <= TOL
        assert max_abs_diff(again["log_probs"], ref_lp) <= TOL


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_stacked_expert_layout_loads(tmp_path, arch):
    """A checkpoint holding HF's in-memory names (stacked experts, Mixtral's ``mlp.``
    router) scores as the per-expert one that save_pretrained writes."""
    from safetensors.torch import save_file
    path = moe_checkpoint(tmp_path / "per_expert", arch, seed=4)
    hf = load_hf(path)
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    (stacked / "config.json").write_text((path / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, stacked / "model.safetensors")
    seqs = random_sequences(torch.Generator().manual_seed(5), 257, 4)
    with Engine(path, kv_cache_tokens=256) as a, Engine(stacked, kv_cache_tokens=256) as b:
        assert a.compute_log_probs(seqs)["log_probs"] == b.compute_log_probs(seqs)["log_probs"]


@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_update_weights_either_naming(tmp_path, layout):
    arch = "Qwen3MoeForCausalLM"
    path = moe_checkpoint(tmp_path / "a", arch, seed=6)
    other = load_hf(moe_checkpoint(tmp_path / "b", arch, seed=7))
    seqs = random_sequences(torch.Generator().manual_seed(6), 257, 4)
    ref_lp, _ = hf_scores(other, seqs)
    if layout == "stacked":
        weights = dict(other.state_dict())
    else:
        from safetensors.torch import load_file
        weights = load_file(tmp_path / "b" / "model.safetensors")
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in weights
    with Engine(path, kv_cache_tokens=256) as engine:
        before = engine.compute_log_probs(seqs)["log_probs"]
        engine.update_weights(weights)
        out = engine.compute_log_probs(seqs)["log_probs"]
    assert max_abs_diff(out, ref_lp) <= TOL
    assert max_abs_diff(before, ref_lp) > 1e-2


@pytest.mark.parametrize("arch, name", [
    ("Qwen3MoeForCausalLM", "model.layers.0.mlp.experts.5.up_proj.weight"),
    ("Qwen2MoeForCausalLM", "model.layers.1.mlp.shared_expert_gate.weight"),
    ("MixtralForCausalLM", "model.layers.2.block_sparse_moe.experts.1.w2.weight"),
])
def test_missing_expert_weight(tmp_path, arch, name):
    from safetensors.torch import load_file, save_file
    path = moe_checkpoint(tmp_path, arch)
    weights = load_file(path / "model.safetensors")
    del weights[name]
    save_file(weights, path / "model.safetensors")
    expected = name.replace("block_sparse_moe", "mlp").replace(".w2.weight", ".down_proj")
    with pytest.raises(ValueError, match=expected.removesuffix(".weight")):
        Engine(path)


def test_dense_layers_follow_config(tmp_path):
    """mlp_only_layers and decoder_sparse_step decide the dense layers, as in HF."""
    from tokenspeed.layers.moe import SparseMoE
    for arch, sparse in [("Qwen3MoeForCausalLM", [0, 2]), ("Qwen2MoeForCausalLM", [1]),
                         ("MixtralForCausalLM", [0, 1, 2])]:
        path = moe_checkpoint(tmp_path / arch, arch)
        with Engine(path, kv_cache_tokens=64) as engine:
            layers = engine.shard.model.model.layers
            assert [i for i, l in enumerate(layers) if isinstance(l.mlp, SparseMoE)] == sparse


@pytest.mark.gpu
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_bf16_error_within_hf_bf16_error(tmp_path, arch):
    path = make_checkpoint(tmp_path, arch, vocab=257, hidden=64, layers=3, seed=5,
                           moe=dict(MOE[arch], moe_intermediate_size=64))
    seqs = random_sequences(torch.Generator().manual_seed(8), 257, 8, max_prompt=48,
                            max_completion=24)
    ref, _ = hf_scores(load_hf(path), seqs)
    hf_lp = hf_bf16_scores(path, seqs)
    with Engine(path, device="cuda", page_size=16, kv_cache_tokens=4096) as engine:
        out = engine.compute_log_probs(seqs)["log_probs"]
    assert mean_abs_diff(out, ref) <= 2 * mean_abs_diff(hf_lp, ref) + 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_deterministic_mode_matches_hf_fp32(tmp_path, arch, device):
    """deterministic=True (grouped_gemm experts, row-blocked router and shared-expert
    gates) keeps fp32 accuracy; its bitwise invariance is tests/test_determinism.py's."""
    path = moe_checkpoint(tmp_path, arch, seed=3)
    seqs = random_sequences(torch.Generator().manual_seed(2), 257, 6, max_prompt=24)
    ref_lp, _ = hf_scores(load_hf(path), seqs)
    with Engine(path, device=device, dtype="float32", deterministic=True, max_batch_tokens=17,
                kv_cache_tokens=1024) as engine:
        assert max_abs_diff(engine.compute_log_probs(seqs)["log_probs"], ref_lp) <= TOL
