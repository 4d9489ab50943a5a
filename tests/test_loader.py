"""The checkpoint loader reads exactly the files HF reads (the index's, else
model.safetensors, else a complete shard set), each tensor from one file only, and
refuses integer or non-finite weights naming the tensor and the file."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import DEVICES
from model_factory import hf_scores, load_hf, make_checkpoint, max_abs_diff, random_sequences
from safetensors.torch import load_file, save_file

from tokenspeed import Engine
from tokenspeed.models import ModelConfig, build_model
from tokenspeed.models.loader import WeightMap

pytest.importorskip("transformers")
TOL = 1e-4
INDEX = "model.safetensors.index.json"


def scores_match_hf(path, hf) -> None:
    seqs = random_sequences(torch.Generator().manual_seed(int(torch.randint(0, 1000, (1,)))),
                            131, 4)
    with Engine(path, kv_cache_tokens=256) as engine:
        out = engine.compute_log_probs(seqs)["log_probs"]
    assert max_abs_diff(out, hf_scores(hf, seqs)[0]) <= TOL


@pytest.fixture
def sharded(tmp_path):
    """(folder of a checkpoint saved in several shards with an index, the HF model)."""
    hf = load_hf(make_checkpoint(tmp_path / "full", "Qwen2ForCausalLM", hidden=64, seed=2))
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="20KB")
    return path, hf


def read_index(path) -> dict[str, str]:
    return json.loads((path / INDEX).read_text())["weight_map"]


def write_index(path, weight_map: dict[str, str]) -> None:
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def pick(items, gen=None):
    """A random element: tests draw which tensor or file to break."""
    items = sorted(items)
    return items[int(torch.randint(0, len(items), (1,), generator=gen))]


def perturbed(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t + torch.randn_like(t) for name, t in weights.items()}


@pytest.mark.parametrize("stray", ["backup.safetensors", "zz-old.safetensors",
                                   "model-00001-of-00002.safetensors"])
def test_stray_file_next_to_model_safetensors_is_ignored(tmp_path, stray):
    path = make_checkpoint(tmp_path, "LlamaForCausalLM", seed=1)
    hf = load_hf(path)
    save_file(perturbed(load_file(path / "model.safetensors")), path / stray)
    scores_match_hf(path, hf)


def test_stray_file_next_to_index_is_ignored(sharded):
    path, hf = sharded
    shard = path / pick(set(read_index(path).values()))
    save_file(perturbed(load_file(shard)), path / "backup.safetensors")
    scores_match_hf(path, hf)


def test_shards_without_index(sharded):
    path, hf = sharded
    shards = sorted(set(read_index(path).values()))
    assert len(shards) > 2 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s)
                                   for s in shards)
    (path / INDEX).unlink()
    save_file(perturbed(load_file(path / shards[0])), path / "stray.safetensors")
    scores_match_hf(path, hf)
    missing = pick(shards)
    (path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        Engine(path)


def test_index_naming_a_missing_file(sharded):
    path, _ = sharded
    weight_map = read_index(path)
    missing = pick(set(weight_map.values()))
    (path / missing).unlink()
    placed = "|".join(re.escape(repr(n)) for n, file in weight_map.items() if file == missing)
    with pytest.raises(FileNotFoundError, match=f"({placed}) in .*{missing}"):
        Engine(path)


def test_index_listing_a_tensor_no_file_holds(sharded):
    path, _ = sharded
    weight_map = read_index(path)
    shard = pick(set(weight_map.values()))
    write_index(path, {**weight_map, "model.layers.0.mlp.extra.weight": shard})
    with pytest.raises(ValueError, match=f"'model.layers.0.mlp.extra.weight' in .*{shard}"):
        Engine(path)


def test_file_holding_a_tensor_the_index_omits(sharded):
    path, _ = sharded
    shard = pick(set(read_index(path).values()))
    weights = load_file(path / shard)
    weights["model.layers.0.mlp.extra.weight"] = torch.randn(4, 4)
    save_file(weights, path / shard)
    with pytest.raises(ValueError, match=f"{shard} holds tensor 'model.layers.0.mlp.extra.weight', "
                                         f"but .*{INDEX} does not list it"):
        Engine(path)


def test_tensor_in_another_file_than_the_index_says(sharded):
    path, _ = sharded
    weight_map = read_index(path)
    name = pick(weight_map)
    elsewhere = pick(set(weight_map.values()) - {weight_map[name]})
    write_index(path, {**weight_map, name: elsewhere})
    with pytest.raises(ValueError, match=f"{re.escape(repr(name))}.*{elsewhere}"):
        Engine(path)


def test_tensor_in_two_shards(sharded):
    """Without an index, a name in two files is ambiguous: an error naming both."""
    path, _ = sharded
    weight_map = read_index(path)
    (path / INDEX).unlink()
    name = pick(weight_map)
    other = pick(set(weight_map.values()) - {weight_map[name]})
    weights = load_file(path / other)
    weights[name] = load_file(path / weight_map[name])[name] + 1
    save_file(weights, path / other)
    with pytest.raises(ValueError, match=f"{re.escape(repr(name))} is in both .*("
                                         f"{weight_map[name]} and .*{other}|"
                                         f"{other} and .*{weight_map[name]})"):
        Engine(path)


def test_no_weights(tmp_path):
    path = make_checkpoint(tmp_path, "LlamaForCausalLM")
    (path / "model.safetensors").rename(path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Engine(path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_tensor_in_checkpoint(tmp_path, dtype):
    path = make_checkpoint(tmp_path, "Qwen3ForCausalLM")
    weights = load_file(path / "model.safetensors")
    name = pick(weights)
    weights[name] = (weights[name] * 10).to(dtype)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(TypeError, match=f"model.safetensors: weight {re.escape(repr(name))}: "
                                        f"expected a floating tensor"):
        Engine(path)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_tensor_in_checkpoint(sharded, bad):
    path, _ = sharded
    weight_map = read_index(path)
    name = pick(weight_map)
    shard = path / weight_map[name]
    weights = load_file(shard)
    flat = weights[name].view(-1)
    flat[int(torch.randint(0, flat.numel(), (1,)))] = bad
    save_file(weights, shard)
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))}: weight {re.escape(repr(name))} "
                                         f"holds NaN or inf"):
        Engine(path)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_map_check_finite(tmp_path, device):
    path = make_checkpoint(tmp_path, "LlamaForCausalLM")
    model = build_model(ModelConfig.from_dir(path), torch.device(device), torch.float32)
    weight_map = WeightMap(model, write_tied_head=True)
    weights = load_file(path / "model.safetensors")
    for name in (pick(weights), "lm_head.weight", "model.norm.weight"):
        tensor = weights[name].to(device)
        weight_map.check(name, tensor)
        for bad in (math.nan, math.inf, -math.inf):
            broken = tensor.clone()
            broken.view(-1)[int(torch.randint(0, broken.numel(), (1,)))] = bad
            with pytest.raises(ValueError, match=f"{re.escape(repr(name))} holds NaN or inf"):
                weight_map.check(name, broken)
            weight_map.check(name, broken, check_finite=False)
    # the old checks stay, and come first
    with pytest.raises(ValueError, match="expected shape"):
        weight_map.check("model.norm.weight", torch.full((3,), math.nan, device=device))
    with pytest.raises(TypeError, match="floating"):
        weight_map.check("model.norm.weight", torch.ones(32, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_first_non_finite_names_the_culprit_and_never_a_finite_overflow(device):
    """The fast path sums each tensor; a finite tensor whose sum overflows (values near the
    dtype's max) must still pass, and a NaN or inf anywhere is found and placed."""
    from tokenspeed.models.loader import first_non_finite
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    tensors = [torch.randn(int(torch.randint(1, 500, (), generator=gen)), generator=gen)
               .to(device=device, dtype=dtype)
               for dtype in (torch.float32, torch.bfloat16, torch.float16) for _ in range(3)]
    huge = torch.full((64,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16, device=device)
    assert first_non_finite(tensors + [huge]) is None
    for bad in (math.nan, math.inf, -math.inf):
        i = int(torch.randint(0, len(tensors), (), generator=gen))
        spoiled = [t.clone() for t in tensors]
        spoiled[i][int(torch.randint(0, spoiled[i].numel(), (), generator=gen))] = bad
        assert first_non_finite([huge] + spoiled) == i + 1
