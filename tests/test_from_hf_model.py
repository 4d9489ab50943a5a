"""Engine.from_hf_model: an engine over a transformers model held in memory scores as one
loaded from the same model saved to disk, and as HF itself."""
from __future__ import annotations

import pytest
import torch
from model_factory import ARCHS, hf_scores, load_hf, make_checkpoint, max_abs_diff, \
    random_sequences

from tokenspeed import Engine

pytest.importorskip("transformers")
VOCAB = 83
KW = dict(device="cpu", dtype="float32", kv_cache_tokens=1024)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_from_hf_model_equals_engine_from_disk_and_hf(tmp_path, arch, tied):
    path = make_checkpoint(tmp_path, arch, vocab=VOCAB, seed=len(arch) + tied, tied=tied)
    hf = load_hf(path)
    seqs = random_sequences(torch.Generator().manual_seed(7), VOCAB, 5)
    with Engine.from_hf_model(hf, **KW) as engine, Engine(path, **KW) as from_disk:
        got = engine.compute_log_probs(seqs)["log_probs"]
        assert got == from_disk.compute_log_probs(seqs)["log_probs"]
    assert max_abs_diff(got, hf_scores(hf, seqs)[0]) <= 1e-4


def test_from_hf_model_rejects_what_is_not_a_model_and_missing_weights(tmp_path):
    with pytest.raises(TypeError, match="must be a transformers PreTrainedModel, got dict"):
        Engine.from_hf_model({"a": 1})
    hf = load_hf(make_checkpoint(tmp_path, "LlamaForCausalLM", vocab=VOCAB))
    del hf.model.layers[1]
    hf.config.num_hidden_layers = 2  # the config promises a layer the weights lack
    with pytest.raises(ValueError, match=r"in-memory LlamaForCausalLM lacks weights for "
                                         r"\['model.layers.1"):
        Engine.from_hf_model(hf, **KW)


@pytest.mark.slow
def test_from_hf_model_tp2_workers(tmp_path):
    path = make_checkpoint(tmp_path, "Qwen2ForCausalLM", vocab=VOCAB, seed=3)
    hf = load_hf(path)
    seqs = random_sequences(torch.Generator().manual_seed(8), VOCAB, 5)
    with Engine.from_hf_model(hf, tp_size=2, **KW) as engine:
        got = engine.compute_log_probs(seqs)["log_probs"]
    assert max_abs_diff(got, hf_scores(hf, seqs)[0]) <= 1e-4
