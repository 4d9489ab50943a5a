"""ModelConfig against transformers 5's configs: valid ones read as HF reads them; a
missing, malformed or unimplemented field is a ValueError naming the field and the file,
never a KeyError and never a silently different model."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import (ARCHS, hf_config, hf_scores, load_hf, make_checkpoint, max_abs_diff,
                           random_sequences)

from tokenspeed import Engine
from tokenspeed.models import ModelConfig

transformers = pytest.importorskip("transformers")
TOL = 1e-4
PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")


def write_config(path, arch: str, **changes):
    """config.json of a small HF config of ``arch`` with ``changes`` (None deletes a key)."""
    config = hf_config(arch).to_dict()
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def edit_config(path, **changes):
    """Edit a saved checkpoint's config.json (None deletes a key)."""
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                  if v is not None}))


def raises_naming(path, *fragments: str, error: type[Exception] = ValueError):
    """The error names the config file and every fragment."""
    with pytest.raises(error) as info:
        ModelConfig.from_dir(path)
    message = str(info.value)
    assert str(path / "config.json") in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@PROPERTY
@given(arch=st.sampled_from(ARCHS), hidden=st.integers(1, 6).map(lambda x: 16 * x),
       heads=st.sampled_from([1, 2, 4, 8]), group=st.sampled_from([1, 2, 4]),
       head_dim=st.one_of(st.none(), st.sampled_from([8, 16, 64])),
       tied=st.booleans(), layers=st.integers(1, 40), vocab=st.integers(1, 200_000))
def test_reads_hf_configs_as_hf(tmp_path_factory, arch, hidden, heads, group, head_dim, tied,
                                layers, vocab):
    kv = max(heads // group, 1)
    hf = hf_config(arch, vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv,
                   tied=tied)
    if head_dim is not None:
        hf.head_dim = head_dim
    path = tmp_path_factory.mktemp("c")
    hf.save_pretrained(path)
    hf = transformers.AutoConfig.from_pretrained(path)  # as HF reads the file back
    config = ModelConfig.from_dir(path)
    hf_head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers,
            config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps,
            config.max_position_embeddings, config.tie_word_embeddings) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers,
        hf.num_attention_heads, hf.num_key_value_heads, hf_head_dim, hf.rms_norm_eps,
        hf.max_position_embeddings, hf.tie_word_embeddings)
    assert config.attention_bias == (arch == "Qwen2ForCausalLM")


@PROPERTY
@given(arch=st.sampled_from(ARCHS), key=st.sampled_from(SIZE_FIELDS),
       value=st.one_of(st.integers(max_value=0), st.booleans(), st.text(max_size=5),
                       st.floats(allow_nan=False), st.lists(st.integers(), max_size=2)))
def test_bad_size_names_field_and_file(tmp_path_factory, arch, key, value):
    path = write_config(tmp_path_factory.mktemp("c"), arch, **{key: value})
    raises_naming(path, f"field {key!r} must be a positive int, got {value!r}")


@PROPERTY
@given(arch=st.sampled_from(ARCHS),
       key=st.sampled_from(["tie_word_embeddings", "is_causal", "use_sliding_window",
                            "attention_bias", "mlp_bias"]),
       value=st.one_of(st.integers(), st.text(max_size=5), st.floats(allow_nan=False)))
def test_bad_flag_names_field_and_file(tmp_path_factory, arch, key, value):
    read_by = {"use_sliding_window": ("Qwen2ForCausalLM", "Qwen3ForCausalLM"),
               "attention_bias": ("LlamaForCausalLM", "Qwen3ForCausalLM"),
               "mlp_bias": ("LlamaForCausalLM",)}.get(key, ARCHS)
    path = write_config(tmp_path_factory.mktemp("c"), arch, **{key: value})
    if arch in read_by:
        raises_naming(path, f"field {key!r} must be true or false, got {value!r}")
    else:  # a field the architecture's HF model does not read is no error
        ModelConfig.from_dir(path)


@pytest.mark.parametrize("key", REQUIRED)
@pytest.mark.parametrize("arch", ARCHS)
def test_missing_field(tmp_path, arch, key):
    config = hf_config(arch).to_dict()
    del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    raises_naming(tmp_path, f"field {key!r} is missing")


def test_not_an_object_or_not_json(tmp_path):
    config = json.dumps(hf_config("Qwen3ForCausalLM").to_dict())
    (tmp_path / "config.json").write_text(json.dumps([json.loads(config)]))
    raises_naming(tmp_path, "must hold a JSON object, got list")
    cut = int(torch.randint(1, len(config) - 1, (1,)))
    (tmp_path / "config.json").write_text(config[:cut])
    raises_naming(tmp_path, "invalid JSON")


def test_gpt2_is_an_unsupported_architecture(tmp_path):
    transformers.GPT2Config(n_head=4, n_embd=32, n_layer=2, vocab_size=131,
                            architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    raises_naming(tmp_path, "'GPT2LMHeadModel' is not supported",
                  "supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM")


@pytest.mark.parametrize("changes, fragments", [
    ({"num_attention_heads": 6, "num_key_value_heads": 4, "head_dim": 16},
     ["num_attention_heads 6 is not a multiple of num_key_value_heads 4"]),
    ({"head_dim": 15}, ["head_dim must be even", "15"]),
    ({"hidden_act": "gelu"}, ["field 'hidden_act'", "'gelu'", "only silu"]),
])
def test_inconsistent_or_unsupported_values(tmp_path, changes, fragments):
    raises_naming(write_config(tmp_path, "LlamaForCausalLM", **changes), *fragments)


# ---- fields that change HF's math and are not implemented: rejected, not ignored ----

@pytest.mark.parametrize("arch", ARCHS)
def test_quantization_config(tmp_path, arch):
    path = write_config(tmp_path, arch, quantization_config={"quant_method": "fp8",
                                                             "weight_block_size": [128, 128]})
    raises_naming(path, "field 'quantization_config'", "quantized")


@pytest.mark.parametrize("arch", ARCHS)
def test_bidirectional(tmp_path, arch):
    raises_naming(write_config(tmp_path, arch, is_causal=False), "field 'is_causal'")


def save_hf_model(path, arch: str, **attributes):
    """A random HF model of ``arch`` with config ``attributes`` set, saved."""
    config = hf_config(arch)
    for key, value in attributes.items():
        setattr(config, key, value)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("arch, key", [("LlamaForCausalLM", "mlp_bias"),
                                       ("LlamaForCausalLM", "attention_bias"),
                                       ("Qwen3ForCausalLM", "attention_bias")])
def test_bias_hf_adds_and_the_engine_lacks(tmp_path, arch, key):
    """HF's model has a bias (mlp_bias: every MLP projection; attention_bias: o_proj as well
    as q/k/v) that this engine's layers have no room for."""
    path = save_hf_model(tmp_path, arch, **{key: True})
    assert any(name.endswith(".bias") for name in load_hf(path).state_dict())
    with pytest.raises(ValueError, match=f"config.json.*field '{key}' is true"):
        Engine(path)


def test_qwen2_biases_whatever_attention_bias_says(tmp_path):
    """Qwen2's modeling always gives q/k/v a bias and reads no attention_bias field."""
    path = make_checkpoint(tmp_path, "Qwen2ForCausalLM", seed=4)
    edit_config(path, attention_bias=False)
    hf = load_hf(path)
    seqs = random_sequences(torch.Generator().manual_seed(5), 131, 4)
    with Engine(path, kv_cache_tokens=256) as engine:
        out = engine.compute_log_probs(seqs)["log_probs"]
    assert max_abs_diff(out, hf_scores(hf, seqs)[0]) <= TOL


def test_top_level_partial_rotary_factor(tmp_path):
    """HF moves a top-level partial_rotary_factor into the rope parameters, where the
    rotary layer rejects it."""
    path = make_checkpoint(tmp_path, "LlamaForCausalLM")
    edit_config(path, partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        Engine(path)


# ---- sliding windows (Qwen2, Qwen3): rejected exactly when they change the math ----

SLIDING = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


def sliding_checkpoint(path, arch: str, seed: int, **fields):
    """A saved checkpoint whose config.json carries ``fields`` and (unless given) no
    layer_types, so HF derives them from use_sliding_window and max_window_layers."""
    path = make_checkpoint(path, arch, seed=seed, max_positions=64)
    edit_config(path, **{"layer_types": None, **fields})
    return path


@pytest.mark.parametrize("fields", [
    # every layer slides, over a window no accepted sequence exceeds
    {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0},
    {"use_sliding_window": True, "sliding_window": 1000, "max_window_layers": 1},
    # a short window that no layer uses
    {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2},
    {"use_sliding_window": True, "sliding_window": 3,
     "layer_types": ["full_attention", "full_attention"]},
    # a window, but use_sliding_window off (HF drops it)
    {"use_sliding_window": False, "sliding_window": 3, "max_window_layers": 0},
])
@pytest.mark.parametrize("arch", SLIDING)
def test_window_that_masks_nothing_matches_hf(tmp_path, arch, fields):
    path = sliding_checkpoint(tmp_path, arch, seed=6, **fields)
    hf = load_hf(path)
    seqs = random_sequences(torch.Generator().manual_seed(7), 131, 5, max_prompt=40,
                            max_completion=24)
    with Engine(path, page_size=4, kv_cache_tokens=512) as engine:
        out = engine.compute_log_probs(seqs)["log_probs"]
    assert max_abs_diff(out, hf_scores(hf, seqs)[0]) <= TOL


def test_llama_ignores_sliding_fields_as_hf_does(tmp_path):
    path = make_checkpoint(tmp_path, "LlamaForCausalLM", seed=8)
    edit_config(path, use_sliding_window=True, sliding_window=3, max_window_layers=0,
                layer_types=["sliding_attention", "sliding_attention"])
    hf = load_hf(path)
    seqs = random_sequences(torch.Generator().manual_seed(9), 131, 4)
    with Engine(path, kv_cache_tokens=256) as engine:
        out = engine.compute_log_probs(seqs)["log_probs"]
    assert max_abs_diff(out, hf_scores(hf, seqs)[0]) <= TOL


@pytest.mark.parametrize("arch", SLIDING)
def test_short_window_is_rejected_and_hf_needs_it(tmp_path, arch):
    """A window shorter than the sequence moves HF's scores; the engine refuses rather
    than score with full attention."""
    window = int(torch.randint(2, 9, (1,)))
    path = sliding_checkpoint(tmp_path, arch, seed=10)
    seqs = random_sequences(torch.Generator().manual_seed(11), 131, 3, max_prompt=30)
    full, _ = hf_scores(load_hf(path), seqs)
    edit_config(path, use_sliding_window=True, sliding_window=window, max_window_layers=1)
    windowed, _ = hf_scores(load_hf(path), seqs)
    assert max_abs_diff(windowed, full) > 1e-2
    with pytest.raises(ValueError, match=f"config.json.*field 'sliding_window' is {window}: "
                                         f"layers \\[1\\]"):
        Engine(path)


@pytest.mark.parametrize("fields, fragments", [
    ({"use_sliding_window": True, "sliding_window": 63,
      "layer_types": ["sliding_attention", "full_attention"]},
     ["field 'sliding_window' is 63", "layers [0]"]),
    # HF cannot run this one: its sliding masks need a window
    ({"use_sliding_window": False, "layer_types": ["full_attention", "sliding_attention"]},
     ["field 'layer_types'", "layers [1]", "no window"]),
    ({"layer_types": ["full_attention"]}, ["field 'layer_types'", "each of the 2 layers"]),
    ({"layer_types": ["full_attention", "chunked_attention"]}, ["field 'layer_types'"]),
    ({"use_sliding_window": True, "sliding_window": 0}, ["field 'sliding_window'", "got 0"]),
    ({"use_sliding_window": True, "max_window_layers": -1},
     ["field 'max_window_layers' must be an int >= 0, got -1"]),
])
@pytest.mark.parametrize("arch", SLIDING)
def test_bad_sliding_fields(tmp_path, arch, fields, fragments):
    path = write_config(tmp_path, arch, **{"max_position_embeddings": 64, "layer_types": None,
                                           **fields})
    raises_naming(path, *fragments)
