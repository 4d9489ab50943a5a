"""`tokenspeed score` through a subprocess, with the built-in model and with --model."""
from __future__ import annotations

import codecs
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from model_factory import hf_scores, load_hf, make_checkpoint, max_abs_diff

pytestmark = pytest.mark.slow  # every test starts the CLI in a fresh process
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "score.jsonl"
MODULE = [sys.executable, "-m", "tokenspeed"]
GOOD = {"prompt_token_ids": [1, 2], "completion_token_ids": [3, 4]}


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "TOKENSPEED_CACHE": str(tmp_path / "cache"), "TOKENSPEED_DEBUG": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **extra}


def run_cli(args: list[str], tmp_path: Path, prog: list[str] | None = None,
            stdin: str | None = None, **env: str):
    return subprocess.run((prog or MODULE) + args, env=cli_env(tmp_path, **env), input=stdin,
                          capture_output=True, text=True, timeout=300)


def write_lines(path: Path, rows: list) -> Path:
    """One line per row: a dict as JSON, a str as it is."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def old_output(tmp_path: Path) -> Path:
    """An output file from an earlier run, alone in its folder."""
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "scores.jsonl"
    out.write_text("old\n")
    return out


def untouched(out: Path) -> bool:
    """The earlier output is as it was and no temporary file is left beside it."""
    return out.read_text() == "old\n" and list(out.parent.iterdir()) == [out]


def error_of(proc) -> str:
    """The one line the CLI ends a failed run with, after checking there is no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.splitlines()[-1]


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
    proc = subprocess.Popen(MODULE + ["score", str(src)], env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, stderr
    assert json.loads(first)["log_probs"]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("line, message", [
    ({"prompt": "a b", "completion_token_ids": [3]},  # was scored as an empty completion
     "line 2: has completion_token_ids, prompt;"),
    ({"prompt_token_ids": [1, 2]}, "line 2: has prompt_token_ids;"),
    ({"prompt": "a", **GOOD}, "line 2: has prompt_token_ids, completion_token_ids, prompt;"),
    ({"id": 7}, "line 2: has neither;"),
    ({"prompt": ["a"], "completion": "b"}, "line 2: prompt must be a string, got list"),
    ('{"prompt_token_ids": [1], "completion_token_ids": [2], "reward": NaN}',
     "line 2: not valid JSON (NaN is not a finite number)"),
    ('{"prompt_token_ids": [1], "completion_token_ids": [2], "reward": 1e999}',
     "line 2: not valid JSON (1e999 is not a finite number)"),
])
def test_a_line_gives_token_ids_or_text_and_finite_numbers(tmp_path, line, message):
    src = write_lines(tmp_path / "in.jsonl", [GOOD, line])
    proc = run_cli(["score", str(src)], tmp_path)
    assert proc.returncode == 1
    assert error_of(proc).startswith("tokenspeed: error: " + message)
    assert proc.stdout == ""  # line 1 was not scored either


def test_text_without_a_tokenizer_asks_for_token_ids(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"prompt": "the cat", "completion": "sat"}])
    proc = run_cli(["score", str(src)], tmp_path)  # the built-in model has no tokenizer
    assert proc.returncode == 1
    message = error_of(proc)
    assert f"model folder {tmp_path / 'cache'}" in message
    assert message.endswith("give prompt_token_ids and completion_token_ids instead")
    assert "sentencepiece" not in proc.stderr


def test_a_bad_late_line_scores_nothing_and_keeps_the_output(tmp_path):
    rows = [GOOD] * 700
    rows[600] = {"prompt_token_ids": [1], "completion_token_ids": [5, 6, 7, 999]}
    src = write_lines(tmp_path / "in.jsonl", rows)
    out = old_output(tmp_path)
    for to_file in (["--output", str(out)], []):
        proc = run_cli(["score", str(src), *to_file], tmp_path)
        assert proc.returncode == 1
        assert error_of(proc) == ("tokenspeed: error: line 601: completion_token_ids[3] is 999, "
                                  "vocabulary is [0, 512)")
        assert proc.stdout == ""
    assert untouched(out)


def test_output_appears_only_complete_and_without_temporary_files(tmp_path):
    out = old_output(tmp_path)
    proc = run_cli(["score", str(EXAMPLE), "-o", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == \
        [json.loads(line)["id"] for line in EXAMPLE.read_text().splitlines()]
    assert list(out.parent.iterdir()) == [out]


def test_ctrl_c_exits_130_and_keeps_the_output(tmp_path):
    src = tmp_path / "big.jsonl"
    src.write_text(EXAMPLE.read_text() * 1200)
    out = old_output(tmp_path)
    # small batches keep it scoring for seconds
    proc = subprocess.Popen(MODULE + ["score", str(src), "-o", str(out), "--max-batch-tokens",
                                      "32"], env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    # interrupt once results reach the disk: the target itself, or any other file
    while out.read_text() == "old\n" and not any(
            f != out and f.stat().st_size for f in out.parent.iterdir()):
        assert proc.poll() is None, "finished before it was interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == "tokenspeed: interrupted"
    assert untouched(out)


def test_a_non_finite_score_fails_naming_the_line(tmp_path):
    from safetensors.torch import save_file
    from tokenspeed.builtin import CONFIG, builtin_weights
    model = tmp_path / "nan-model"
    model.mkdir()
    weights = builtin_weights()
    # finite weights (the loader rejects others) whose logit overflows after token 7 only:
    # its hidden state points along axis 0, where token 9's head row is 5e37
    weights["model.embed_tokens.weight"][7] = 0.0
    weights["model.embed_tokens.weight"][7, 0] = 100.0
    weights["lm_head.weight"][9] = 0.0
    weights["lm_head.weight"][9, 0] = 5e37
    save_file(weights, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps(CONFIG))
    src = write_lines(tmp_path / "in.jsonl",
                      [GOOD, {"prompt_token_ids": [1, 7], "completion_token_ids": [2, 3]}])
    out = old_output(tmp_path)
    proc = run_cli(["score", str(src), "--model", str(model), "-o", str(out)], tmp_path)
    assert proc.returncode == 1
    assert error_of(proc).startswith("tokenspeed: error: line 2: the model gave a score that "
                                     "is not finite")
    assert untouched(out)  # line 1's result was written, but only to the temporary file


def corrupt_model(tmp_path: Path) -> Path:
    from tokenspeed.builtin import CONFIG
    model = tmp_path / "corrupt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    return model


def gpt2_model(tmp_path: Path) -> Path:
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
        "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
        "activation_function": "gelu_new"}))
    return model


@pytest.mark.parametrize("case", ["input folder", "output folder", "full disk",
                                  "corrupt weights", "GPT-2 folder"])
def test_io_and_model_errors_are_one_line(tmp_path, case):
    args, expected = {
        "input folder": (lambda: [str(tmp_path)], f"{tmp_path}: Is a directory"),
        "output folder": (lambda: [str(EXAMPLE), "-o", str(tmp_path)],
                          f"{tmp_path}: Is a directory"),
        "full disk": (lambda: [str(EXAMPLE), "-o", "/dev/full"], "No space left on device"),
        "corrupt weights": (lambda: [str(EXAMPLE), "--model", str(corrupt_model(tmp_path))],
                            f"cannot load the model in {tmp_path / 'corrupt'}: SafetensorError: "),
        "GPT-2 folder": (lambda: [str(EXAMPLE), "--model", str(gpt2_model(tmp_path))], ""),
    }[case]
    if case == "full disk" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    proc = run_cli(["score", *args()], tmp_path)
    assert proc.returncode == 1
    assert error_of(proc).startswith("tokenspeed: error: " + expected)


def test_debug_shows_the_traceback_of_an_unexpected_error(tmp_path):
    args = ["score", str(EXAMPLE), "--model", str(corrupt_model(tmp_path))]
    assert "SafetensorError" in error_of(run_cli(args, tmp_path))
    proc = run_cli(args, tmp_path, TOKENSPEED_DEBUG="1")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "SafetensorError" in proc.stderr.splitlines()[-1]


def test_output_to_a_named_pipe_streams_into_it(tmp_path):
    """A FIFO (like /dev/null) is written in place, never replaced by a renamed file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    try:
        proc = run_cli(["score", str(EXAMPLE), "-o", str(fifo)], tmp_path)
        received, _ = reader.communicate(timeout=60)
    finally:
        reader.kill()
    assert proc.returncode == 0, proc.stderr
    assert len(received.splitlines()) == 12
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_utf8_bom_is_accepted(tmp_path):
    text = EXAMPLE.read_text()
    src = tmp_path / "in.jsonl"
    src.write_bytes(codecs.BOM_UTF8 + text.encode())
    from_file = run_cli(["score", str(src)], tmp_path)
    from_stdin = run_cli(["score", "-"], tmp_path, stdin="\ufeff" + text)
    assert from_file.returncode == 0, from_file.stderr
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_file.stdout == from_stdin.stdout
    assert [json.loads(line)["id"] for line in from_file.stdout.splitlines()] == \
        [json.loads(line)["id"] for line in text.splitlines()]


def test_score_help_says_how_text_is_tokenized(tmp_path):
    import tokenspeed.cli
    proc = run_cli(["score", "--help"], tmp_path)
    assert proc.returncode == 0
    for text in (proc.stdout, tokenspeed.cli.__doc__):
        words = " ".join(text.split()).lower()
        assert "tokenized separately" in words and "no chat template" in words
        assert "the prompt with the tokenizer's special tokens" in words


@pytest.mark.parametrize("prog", ["module", "console script"])
def test_version(tmp_path, prog):
    import tokenspeed
    if prog == "console script" and shutil.which("tokenspeed") is None:
        pytest.skip("package not pip-installed")
    proc = run_cli(["--version"], tmp_path, prog=MODULE if prog == "module" else ["tokenspeed"])
    assert proc.returncode == 0
    assert proc.stdout == f"tokenspeed {tokenspeed.__version__}\n"
