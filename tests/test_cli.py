"""`tokenspeed score` through a subprocess, with the built-in model and with --model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from model_factory import hf_scores, load_hf, make_checkpoint, max_abs_diff

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "score.jsonl"


def run_cli(args: list[str], tmp_path: Path, prog: list[str] | None = None):
    env = {**os.environ, "TOKENSPEED_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run((prog or [sys.executable, "-m", "tokenspeed"]) + args, env=env,
                          capture_output=True, text=True, timeout=300)


def test_builtin_model_on_the_example(tmp_path):
    proc = run_cli(["score", str(EXAMPLE)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    inputs = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    outputs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(outputs) == len(inputs)
    for i, o in zip(inputs, outputs):
        assert o["id"] == i["id"]  # other fields pass through
        assert len(o["log_probs"]) == len(i["completion_token_ids"])
        assert all(lp < 0 for lp in o["log_probs"])
    assert "scored 12 sequences" in proc.stderr and "tokens/s" in proc.stderr
    assert (tmp_path / "cache").is_dir()
    # the second run reuses the cached model and gives the same numbers
    assert run_cli(["score", str(EXAMPLE)], tmp_path).stdout == proc.stdout


def test_with_model_entropy_and_output_file(tmp_path):
    pytest.importorskip("transformers")
    model = make_checkpoint(tmp_path / "model", "Qwen2ForCausalLM", vocab=101)
    seqs = [{"prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5], "tag": "a"},
            {"prompt_token_ids": [9], "completion_token_ids": []},
            {"prompt_token_ids": [7, 8], "completion_token_ids": [100, 0, 50]}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(s) + "\n" for s in seqs))
    out = tmp_path / "out.jsonl"
    proc = run_cli(["score", str(src), "--model", str(model), "--output", str(out),
                    "--entropy", "--temperature", "0.7", "--max-batch-tokens", "3",
                    "--device", "cpu", "--dtype", "float32"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ref_lp, ref_ent = hf_scores(load_hf(model), seqs, 0.7)
    assert max_abs_diff([r["log_probs"] for r in rows], ref_lp) <= 1e-4
    assert max_abs_diff([r["entropy"] for r in rows], ref_ent) <= 1e-4
    assert rows[0]["tag"] == "a"


def test_bad_line_is_named(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt_token_ids": [1], "completion_token_ids": [2]}\n'
                   '{"prompt_token_ids": [1], "completion_token_ids": [512]}\n')
    proc = run_cli(["score", str(src)], tmp_path)
    assert proc.returncode == 1
    assert "line 2: completion_token_ids[0] is 512" in proc.stderr


@pytest.mark.skipif(shutil.which("tokenspeed") is None, reason="package not pip-installed")
def test_console_script(tmp_path):
    proc = run_cli(["score", str(EXAMPLE)], tmp_path, prog=["tokenspeed"])
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 12


def test_text_fields_with_a_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = make_checkpoint(tmp_path / "model", "LlamaForCausalLM", vocab=len(words))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(model)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "the cat sat", "completion": "on a mat"}) + "\n")
    proc = run_cli(["score", str(src), "--model", str(model)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    ids = {"prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 6, 5]}
    assert row["prompt_token_ids"] == ids["prompt_token_ids"]
    assert max_abs_diff([row["log_probs"]], hf_scores(load_hf(model), [ids])[0]) <= 1e-4


def test_closed_output_pipe_ends_quietly(tmp_path):
    """`tokenspeed score big.jsonl | head -1`: the reader leaves early; the CLI stops with
    SIGPIPE's conventional status and no traceback."""
    src = tmp_path / "big.jsonl"
    src.write_text(EXAMPLE.read_text() * 400)  # far more output than a pipe buffers
    env = {**os.environ, "TOKENSPEED_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tokenspeed", "score", str(src)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, stderr
    assert json.loads(first)["log_probs"]
    assert "Traceback" not in stderr
