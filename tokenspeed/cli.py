"""`tokenspeed score INPUT.jsonl`: JSONL in, JSONL out with log_probs (and entropy) added.

Each input line is an object with prompt_token_ids and completion_token_ids (or, when the
model directory has a tokenizer, prompt and completion text); every other field passes
through. Progress goes to stderr, results to --output or stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

# sequences handed to the engine per call: large enough to fill its batches, small enough
# for the progress bar to move
GROUP_SEQUENCES = 256


class InputError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenspeed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score completions of a JSONL file")
    score.add_argument("input", help="JSONL input file ('-' for stdin)")
    score.add_argument("--model", help="HF checkpoint directory (default: the built-in model)")
    score.add_argument("--output", "-o", help="JSONL output file (default: stdout)")
    score.add_argument("--temperature", type=float, default=1.0)
    score.add_argument("--entropy", action="store_true", help="also output per-token entropy")
    score.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    score.add_argument("--dtype", help="bfloat16, float16 or float32 "
                                       "(default: bfloat16 on cuda, float32 on cpu)")
    score.add_argument("--max-batch-tokens", type=int, default=8192)
    return parser


def _read_records(stream: TextIO) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for n, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"line {n}: expected a JSON object, got {type(record).__name__}")
        records.append((n, record))
    return records


class _Tokenizer:
    """Turns prompt/completion text into ids with the model directory's tokenizer."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._tok = None

    def __call__(self, line: int, record: dict[str, Any]) -> dict[str, Any]:
        if "prompt_token_ids" in record or "prompt" not in record:
            return record
        if self._tok is None:
            try:
                from transformers import AutoTokenizer
                self._tok = AutoTokenizer.from_pretrained(str(self.model_dir))
            except Exception as e:  # noqa: BLE001 - any failure means: no usable tokenizer
                raise InputError(f"line {line}: text fields need a tokenizer in "
                                 f"{self.model_dir} and transformers installed ({e})") from None
        prompt = self._tok(record["prompt"])["input_ids"]
        completion = self._tok(record.get("completion", ""), add_special_tokens=False)["input_ids"]
        return {**record, "prompt_token_ids": prompt, "completion_token_ids": completion}


def _groups(records: list, size: int) -> Iterator[list]:
    for i in range(0, len(records), size):
        yield records[i:i + size]


def score(args: argparse.Namespace) -> int:
    from . import Engine
    from .builtin import builtin_model_dir

    model_dir = Path(args.model) if args.model else builtin_model_dir()
    if args.input == "-":
        records = _read_records(sys.stdin)
    else:
        with open(args.input) as f:
            records = _read_records(f)
    tokenize = _Tokenizer(model_dir)
    records = [(n, tokenize(n, r)) for n, r in records]
    out = open(args.output, "w") if args.output else sys.stdout
    total_tokens = 0
    try:
        with Engine(model_dir, device=args.device, dtype=args.dtype,
                    max_batch_tokens=args.max_batch_tokens) as engine, \
                tqdm(total=len(records), unit="seq", file=sys.stderr, desc="scoring") as bar:
            start = time.perf_counter()  # scoring only: not the first-use build and load
            for group in _groups(records, GROUP_SEQUENCES):
                try:
                    result = engine.compute_log_probs([r for _, r in group], args.temperature,
                                                      return_entropy=args.entropy)
                except (ValueError, TypeError) as e:
                    # name the input line instead of the index inside this group
                    m = re.match(r"sequence (\d+): (.*)", str(e), re.S)
                    raise InputError(f"line {group[int(m[1])][0]}: {m[2]}" if m
                                     else str(e)) from None
                for i, (_, record) in enumerate(group):
                    record = {**record, "log_probs": result["log_probs"][i]}
                    if args.entropy:
                        record["entropy"] = result["entropy"][i]
                    out.write(json.dumps(record) + "\n")
                    total_tokens += len(record["log_probs"])
                bar.update(len(group))
                bar.set_postfix(tokens=total_tokens)
    finally:
        if out is not sys.stdout:
            out.close()
    elapsed = time.perf_counter() - start
    print(f"tokenspeed: scored {len(records)} sequences, {total_tokens} tokens in "
          f"{elapsed:.2f} s ({total_tokens / max(elapsed, 1e-9):,.0f} tokens/s)",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return score(args)
    except (InputError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"tokenspeed: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (`tokenspeed score x.jsonl | head`): stop quietly, as Unix
        # tools do; point stdout at devnull so the interpreter's final flush cannot raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
