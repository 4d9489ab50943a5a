"""`tokenspeed score --model MOE_DIR`: MoE scores, --routed-experts, and replay from a
"routed_experts" input field, through a subprocess."""
from __future__ import annotations

import json

import pytest
import torch
from model_factory import hf_scores, load_hf, make_checkpoint, max_abs_diff
from test_cli import error_of, run_cli, write_lines
from test_moe_models import moe_checkpoint
from test_moe_routing import hf_routing, random_routing

from tokenspeed import Engine

pytest.importorskip("transformers")
ARGS = ["--device", "cpu", "--dtype", "float32", "--max-batch-tokens", "7"]


def test_scores_and_routed_experts(tmp_path):
    model = moe_checkpoint(tmp_path / "model", "MixtralForCausalLM", seed=9)
    seqs = [{"prompt_token_ids": [1, 2, 3, 4, 5], "completion_token_ids": [6, 7], "tag": "a"},
            {"prompt_token_ids": [1, 2, 3, 4, 5], "completion_token_ids": [250, 0, 9]}]
    proc = run_cli(["score", str(write_lines(tmp_path / "in.jsonl", seqs)), "--model",
                    str(model), "--routed-experts", *ARGS], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    hf = load_hf(model)
    assert max_abs_diff([r["log_probs"] for r in rows], hf_scores(hf, seqs)[0]) <= 1e-4
    for s, r in zip(seqs, rows):
        assert torch.equal(torch.tensor(r["routed_experts"], dtype=torch.int32),
                           hf_routing(hf, s, 2))
    assert rows[0]["tag"] == "a"

    forced = [dict(s, routed_experts=random_routing(
        torch.Generator().manual_seed(i), len(s["prompt_token_ids"]) +
        len(s["completion_token_ids"]) - 1, 3, 8, 2).tolist()) for i, s in enumerate(seqs)]
    proc = run_cli(["score", str(write_lines(tmp_path / "forced.jsonl", forced)), "--model",
                    str(model), *ARGS], tmp_path)
    assert proc.returncode == 0, proc.stderr
    with Engine(model, device="cpu", dtype="float32", enable_prefix_cache=False,
                kv_cache_tokens=256) as engine:
        want = engine.compute_log_probs(forced)["log_probs"]
    got = [json.loads(line)["log_probs"] for line in proc.stdout.splitlines()]
    assert max_abs_diff(got, want) <= 1e-5


def test_bad_routing_and_dense_model_are_named(tmp_path):
    model = moe_checkpoint(tmp_path / "moe", "MixtralForCausalLM", seed=9)
    bad = [{"prompt_token_ids": [1, 2], "completion_token_ids": [3]},
           {"prompt_token_ids": [1, 2], "completion_token_ids": [3],
            "routed_experts": [[[0, 1], [2, 2], [0, 1]], [[0, 1], [2, 3], [0, 1]]]}]
    proc = run_cli(["score", str(write_lines(tmp_path / "bad.jsonl", bad)), "--model",
                    str(model), *ARGS], tmp_path)
    assert proc.returncode != 0
    assert error_of(proc).endswith("line 2: routed_experts[0][1] names an expert twice: [2, 2]")
    dense = make_checkpoint(tmp_path / "dense", "Qwen2ForCausalLM", vocab=101)
    proc = run_cli(["score", str(write_lines(tmp_path / "ok.jsonl", bad[:1])), "--model",
                    str(dense), "--routed-experts", *ARGS], tmp_path)
    assert proc.returncode != 0 and "no mixture-of-experts layers" in error_of(proc)
