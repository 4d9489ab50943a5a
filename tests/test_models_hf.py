"""The engine's models against HF transformers in fp32 on random-weight checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import DEVICES
from model_factory import (ARCHS, hf_bf16_scores, hf_scores, load_hf, make_checkpoint, max_abs_diff,
                           mean_abs_diff, random_sequences)

from tokenspeed import Engine

pytest.importorskip("transformers")
TOL = 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_hf_fp32(tmp_path, arch, tied, device):
    vocab = 131 if tied else 257  # odd sizes: no vector width divides them
    path = make_checkpoint(tmp_path, arch, tied=tied, vocab=vocab, seed=3)
    hf = load_hf(path)
    seqs = random_sequences(torch.Generator().manual_seed(1), vocab, 6, max_prompt=24)
    for temperature in (1.0, 0.6):
        ref_lp, ref_ent = hf_scores(hf, seqs, temperature)
        for chunk in (None, 40):
            with Engine(path, device=device, dtype="float32", page_size=4, max_batch_tokens=17,
                        kv_cache_tokens=512, lean_vocab_chunk=chunk) as engine:
                out = engine.compute_log_probs(seqs, temperature, return_entropy=True)
            assert max_abs_diff(out["log_probs"], ref_lp) <= TOL
            assert max_abs_diff(out["entropy"], ref_ent) <= TOL


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
     "rope_theta": 500.0},
])
def test_rope_scaling_matches_hf(tmp_path, rope):
    path = make_checkpoint(tmp_path, "LlamaForCausalLM", rope=rope, hidden=64, heads=2,
                           kv_heads=1)
    hf = load_hf(path)
    # long enough to cross every wavelength band of the scaled frequencies
    seqs = random_sequences(torch.Generator().manual_seed(2), 131, 3, max_prompt=90,
                            max_completion=30)
    ref_lp, _ = hf_scores(hf, seqs)
    with Engine(path, page_size=16, kv_cache_tokens=1024) as engine:
        out = engine.compute_log_probs(seqs)
    assert max_abs_diff(out["log_probs"], ref_lp) <= TOL


def test_sharded_checkpoint(tmp_path):
    path = make_checkpoint(tmp_path / "full", "Qwen2ForCausalLM", hidden=64)
    hf = load_hf(path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    seqs = random_sequences(torch.Generator().manual_seed(4), 131, 3)
    with Engine(path, kv_cache_tokens=256) as a, Engine(tmp_path / "sharded",
                                                        kv_cache_tokens=256) as b:
        assert a.compute_log_probs(seqs)["log_probs"] == b.compute_log_probs(seqs)["log_probs"]


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture_lists_supported(tmp_path):
    path = make_checkpoint(tmp_path, "LlamaForCausalLM")
    _edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM.*"
                                         "Qwen3ForCausalLM"):
        Engine(path)


def test_unsupported_rope_type(tmp_path):
    path = make_checkpoint(tmp_path, "LlamaForCausalLM")
    _edit_config(path, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    with pytest.raises(ValueError, match="longrope.*supported: default, linear, llama3, yarn"):
        Engine(path)


@pytest.mark.parametrize("arch, name", [
    ("LlamaForCausalLM", "model.layers.1.mlp.down_proj.weight"),
    # one shard of a fused parameter: the others alone must not pass for the whole
    ("LlamaForCausalLM", "model.layers.0.self_attn.k_proj.weight"),
    ("LlamaForCausalLM", "model.layers.1.mlp.gate_proj.weight"),
    ("Qwen2ForCausalLM", "model.layers.0.self_attn.v_proj.bias"),
])
def test_missing_weight(tmp_path, arch, name):
    from safetensors.torch import load_file, save_file
    path = make_checkpoint(tmp_path, arch)
    weights = load_file(path / "model.safetensors")
    del weights[name]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match=name.rsplit(".", 1)[0]):
        Engine(path)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_error_within_hf_bf16_error(tmp_path, arch):
    """bf16 has no fixed tolerance: the engine's error against HF fp32 must stay within a
    small multiple of HF-bf16's own error on the same inputs."""
    path = make_checkpoint(tmp_path, arch, vocab=257, hidden=64, seed=5)
    seqs = random_sequences(torch.Generator().manual_seed(8), 257, 8, max_prompt=48,
                            max_completion=24)
    ref, _ = hf_scores(load_hf(path), seqs)
    hf_lp = hf_bf16_scores(path, seqs)
    with Engine(path, device="cuda", page_size=16, kv_cache_tokens=4096) as engine:
        assert engine.config.dtype == torch.bfloat16
        out = engine.compute_log_probs(seqs)["log_probs"]
    assert mean_abs_diff(out, ref) <= 2 * mean_abs_diff(hf_lp, ref) + 1e-4
    assert max_abs_diff(out, ref) <= 4 * max_abs_diff(hf_lp, ref) + 1e-3


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_update_tied_embedding_moves_head_as_hf(tmp_path, name):
    """In a tied model the embedding is the head: updating either name updates both, as
    loading that name into the HF model does."""
    path = make_checkpoint(tmp_path, "Qwen2ForCausalLM", tied=True, vocab=131, seed=7)
    hf = load_hf(path)
    seqs = random_sequences(torch.Generator().manual_seed(3), 131, 4)
    new = torch.randn(131, 32, generator=torch.Generator().manual_seed(5)) * 0.3
    hf.load_state_dict({name: new}, strict=False)
    assert torch.equal(hf.lm_head.weight, new) and torch.equal(hf.model.embed_tokens.weight, new)
    ref_lp, _ = hf_scores(hf, seqs)
    with Engine(path, kv_cache_tokens=256) as engine:
        before = engine.compute_log_probs(seqs)["log_probs"]
        engine.update_weights({name: new})
        out = engine.compute_log_probs(seqs)["log_probs"]
    assert max_abs_diff(out, ref_lp) <= TOL
    assert max_abs_diff(out, before) > 1e-2


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "rope_theta": 500.0},
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0},
])
def test_rope_scaling_without_original_length_matches_hf(tmp_path, rope):
    """HF takes original_max_position_embeddings from max_position_embeddings when the
    rope parameters leave it out."""
    path = make_checkpoint(tmp_path, "LlamaForCausalLM", rope=rope, hidden=64, heads=2,
                           kv_heads=1, max_positions=64)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"].pop("original_max_position_embeddings", None)
    _edit_config(path, rope_parameters=config["rope_parameters"])
    hf = load_hf(path)
    seqs = random_sequences(torch.Generator().manual_seed(2), 131, 3, max_prompt=40,
                            max_completion=20)
    with Engine(path, page_size=16, kv_cache_tokens=1024) as engine:
        out = engine.compute_log_probs(seqs)
    assert max_abs_diff(out["log_probs"], hf_scores(hf, seqs)[0]) <= TOL
