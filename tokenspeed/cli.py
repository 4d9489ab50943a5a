"""`tokenspeed score INPUT.jsonl`: JSONL in, JSONL out with log_probs (and entropy) added.

Each input line is a JSON object in one of two forms: token ids (prompt_token_ids and
completion_token_ids) or text (prompt and completion, when the model folder has a
tokenizer). Prompt and completion text are tokenized separately: the prompt with the
tokenizer's special tokens (such as BOS), the completion without them. No chat template
is applied: format chat prompts yourself, or give token ids. Every other field passes
through; a "routed_experts" field ([tokens - 1][MoE layers][top_k] expert ids, MoE
models) forces those experts (routing replay).

`tokenspeed serve [MODEL_DIR]` serves the same scoring over HTTP (docs/server.md).

Every line is checked before anything is scored. Results go to stdout as they are scored,
or to --output, which appears only when complete; progress goes to stderr. Set
TOKENSPEED_DEBUG=1 to see the traceback behind an error.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from tqdm import tqdm

from . import Engine, __version__
from .builtin import builtin_model_dir
from .inputs import InvalidSequenceError
from .text import TOKENIZER_FILES, encode, has_tokenizer, load_tokenizer

# sequences handed to the engine per call: large enough to fill its batches, small enough
# for the progress bar to move
GROUP_SEQUENCES = 256
ID_FIELDS = ("prompt_token_ids", "completion_token_ids")
TEXT_FIELDS = ("prompt", "completion")

Record = tuple[int, dict[str, Any]]  # (input line number, the line's object)


class CLIError(Exception):
    """A failure already worded for the user."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenspeed", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    engine_flags = argparse.ArgumentParser(add_help=False)
    engine_flags.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    engine_flags.add_argument("--dtype", help="bfloat16, float16 or float32 "
                                              "(default: bfloat16 on cuda, float32 on cpu)")
    engine_flags.add_argument("--max-batch-tokens", type=int, default=8192)
    engine_flags.add_argument("--deterministic", action="store_true",
                              help="batch-invariant mode: every score bitwise the same "
                                   "whatever else is scored with it (docs/design.md)")
    score = sub.add_parser("score", help="score completions of a JSONL file", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           parents=[engine_flags])
    score.add_argument("input", help="JSONL input file ('-' for stdin)")
    score.add_argument("--model", help="HF checkpoint directory (default: the built-in model)")
    score.add_argument("--output", "-o", help="JSONL output file (default: stdout)")
    score.add_argument("--temperature", type=float, default=1.0)
    score.add_argument("--entropy", action="store_true", help="also output per-token entropy")
    score.add_argument("--top-k", type=int, default=0,
                       help="score under the sampler's top-k filter (0: off; at most 64)")
    score.add_argument("--top-p", type=float, default=1.0,
                       help="score under the sampler's top-p filter (1: off)")
    score.add_argument("--min-p", type=float, default=0.0,
                       help="score under the sampler's min-p filter (0: off)")
    score.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                       help="also output the K most likely tokens per position (at most 64)")
    score.add_argument("--routed-experts", action="store_true",
                       help="MoE models: also output the experts every token but the last "
                            "was routed to, [tokens - 1][MoE layers][top_k]")
    compare = sub.add_parser(
        "compare", help="agreement of two scored files' log_probs",
        description="Agreement of the log_probs of two scored JSONL files, line by line "
                    "(tokenspeed.metrics: mean and max |delta|, the k3 estimate of "
                    "KL(A || B), the mean of exp(|delta|)), with the least agreeing lines.")
    compare.add_argument("reference", help="scored JSONL file A ('log_probs' on every line)")
    compare.add_argument("candidate", help="scored JSONL file B, the same sequences in order")
    compare.add_argument("--worst", type=int, default=5, help="lines to list (default 5)")
    serve = sub.add_parser("serve", help="score over HTTP (POST /v1/score)",
                           parents=[engine_flags])
    serve.add_argument("model", nargs="?", metavar="MODEL_DIR",
                       help="HF checkpoint directory (default: the built-in model)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=30010)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    serve.add_argument("--max-request-bytes", type=int, default=64 << 20,
                       help="larger request bodies get 413 (default: 64 MiB)")
    return parser


def _finite(text: str) -> float:
    # Python's json reads NaN, Infinity and 1e999, which other JSON readers reject and
    # which could not be written back
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError(f"{text} is not a finite number", text, 0)
    return value


def _parse_lines(stream: BinaryIO) -> list[Record]:
    records = []
    for n, raw in enumerate(stream, start=1):
        if n == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # written by some Windows editors
        try:
            line = raw.decode()
        except UnicodeDecodeError as e:
            raise CLIError(f"line {n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_float=_finite, parse_constant=_finite)
        except json.JSONDecodeError as e:
            raise CLIError(f"line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise CLIError(f"line {n}: expected a JSON object, got {type(record).__name__}")
        records.append((n, record))
    return records


def _read_records(path: str) -> list[Record]:
    if path == "-":
        return _parse_lines(sys.stdin.buffer)
    with open(path, "rb") as f:
        return _parse_lines(f)


def _is_text(n: int, record: dict[str, Any]) -> bool:
    """Whether the line gives text; raises unless it gives exactly one complete form, so
    that no field is silently ignored."""
    given = [k for k in ID_FIELDS + TEXT_FIELDS if k in record]
    if given == list(ID_FIELDS):
        return False
    if given != list(TEXT_FIELDS):
        raise CLIError(f"line {n}: has {', '.join(given) or 'neither'}; a line needs either "
                       f"prompt_token_ids and completion_token_ids (token ids) or prompt and "
                       f"completion (text)")
    for key in TEXT_FIELDS:
        if not isinstance(record[key], str):
            raise CLIError(f"line {n}: {key} must be a string, got {type(record[key]).__name__}")
    return True


class _Tokenizer:
    """Turns prompt/completion text into ids with the model folder's tokenizer, loaded on
    the first text line."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._tok = None

    def _load(self, line: int) -> Any:
        if not has_tokenizer(self.model_dir):
            raise CLIError(f"line {line}: prompt and completion are text, but the model folder "
                           f"{self.model_dir} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                           f"give prompt_token_ids and completion_token_ids instead")
        try:
            return load_tokenizer(self.model_dir)
        except Exception as e:  # noqa: BLE001 - any failure means: no usable tokenizer
            raise CLIError(f"line {line}: cannot load the tokenizer in {self.model_dir}: "
                           f"{e}") from e

    def __call__(self, line: int, record: dict[str, Any]) -> dict[str, Any]:
        if self._tok is None:
            self._tok = self._load(line)
        prompt, completion = encode(self._tok, record["prompt"], record["completion"])
        return {**record, "prompt_token_ids": prompt, "completion_token_ids": completion}


def _with_token_ids(records: list[Record], model_dir: Path) -> list[Record]:
    tokenize = _Tokenizer(model_dir)
    return [(n, tokenize(n, r) if _is_text(n, r) else r) for n, r in records]


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    """stdout, or a file that only ever appears complete: it is written under a temporary
    name in the target's folder and renamed over the target once everything succeeded."""
    if path is None:
        yield sys.stdout
        return
    if os.path.exists(path) and not os.path.isfile(path):
        # a device or a named pipe (/dev/null, a FIFO) streams and must never be renamed
        # over; a directory fails here with IsADirectoryError
        with open(path, "w") as f:
            yield f
        return
    target = Path(os.path.realpath(path))  # through a symlink: replace its file, keep it
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        f = open(tmp, "x")
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror}") from e
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink()
        raise


def _load_engine(model_dir: Path, args: argparse.Namespace) -> Engine:
    try:
        return Engine(model_dir, device=args.device, dtype=args.dtype,
                      max_batch_tokens=args.max_batch_tokens, deterministic=args.deterministic)
    except (ValueError, TypeError, OSError):
        raise  # worded for the user by the engine
    except Exception as e:
        # a folder the engine cannot read (another architecture, a corrupt weights file)
        # fails inside libraries whose messages do not say which folder
        raise CLIError(f"cannot load the model in {model_dir}: {type(e).__name__}: {e}") from e


def _validate(engine: Engine, records: list[Record], args: argparse.Namespace) -> None:
    try:
        engine.validate([r for _, r in records], args.temperature, **_rich_args(args))
    except InvalidSequenceError as e:
        raise CLIError(f"line {records[e.index][0]}: {e.detail}") from None


def _json_line(line: int, record: dict[str, Any]) -> str:
    try:
        return json.dumps(record, allow_nan=False) + "\n"
    except ValueError:
        # inputs hold only finite numbers (_finite), so a score is not
        raise CLIError(f"line {line}: the model gave a score that is not finite (NaN or "
                       f"infinity), which JSON cannot hold") from None


def _groups(records: list, size: int) -> Iterator[list]:
    for i in range(0, len(records), size):
        yield records[i:i + size]


# what a line's output holds of the results, in this order
RICH_OUTPUTS = ("log_probs", "entropy", "top_logprobs", "token_ids_logprobs")


def _rich_args(args: argparse.Namespace) -> dict[str, Any]:
    return dict(top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                top_logprobs=args.top_logprobs)


def _filtered(args: argparse.Namespace, record: dict[str, Any]) -> bool:
    """Whether a sampler filter applies to the line (its own settings or the flags')."""
    return (record.get("top_k", args.top_k) != 0 or record.get("top_p", args.top_p) != 1.0
            or record.get("min_p", args.min_p) != 0.0)


def _cut_to_null(value: Any) -> Any:
    """-inf (a token the sampler's filters cut) as JSON null, which JSON can hold."""
    if isinstance(value, float) and value == -math.inf:
        return None
    if isinstance(value, list):
        return [_cut_to_null(v) for v in value]
    if isinstance(value, dict):
        return {k: _cut_to_null(v) for k, v in value.items()}
    return value


def _score_into(out: TextIO, engine: Engine, records: list[Record],
                args: argparse.Namespace) -> int:
    """Scores every record, writes its line to ``out``; returns the tokens scored."""
    total_tokens = 0
    with tqdm(total=len(records), unit="seq", file=sys.stderr, desc="scoring") as bar:
        for group in _groups(records, GROUP_SEQUENCES):
            result = engine.compute_log_probs([r for _, r in group], args.temperature,
                                              return_entropy=args.entropy,
                                              return_routed_experts=args.routed_experts,
                                              **_rich_args(args))
            for i, (n, record) in enumerate(group):
                scores = {key: result[key][i] for key in RICH_OUTPUTS if key in result}
                if _filtered(args, record):
                    scores = _cut_to_null(scores)
                if args.routed_experts:
                    scores["routed_experts"] = result["routed_experts"][i]
                out.write(_json_line(n, {**record, **scores}))
                total_tokens += len(scores["log_probs"])
            bar.update(len(group))
            bar.set_postfix(tokens=total_tokens)
    return total_tokens


def score(args: argparse.Namespace) -> int:
    model_dir = Path(args.model) if args.model else builtin_model_dir()
    records = _with_token_ids(_read_records(args.input), model_dir)
    with _output(args.output) as out, _load_engine(model_dir, args) as engine:
        if args.routed_experts and engine.model_config.moe is None:
            raise CLIError(f"--routed-experts: the model in {model_dir} has no "
                           f"mixture-of-experts layers")
        _validate(engine, records, args)
        start = time.perf_counter()  # scoring only: not the first-use build and load
        total_tokens = _score_into(out, engine, records, args)
        elapsed = time.perf_counter() - start
    print(f"tokenspeed: scored {len(records)} sequences, {total_tokens} tokens in "
          f"{elapsed:.2f} s ({total_tokens / max(elapsed, 1e-9):,.0f} tokens/s)",
          file=sys.stderr)
    return 0


def _describe(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        # "out.jsonl: Is a directory", as Unix tools word it
        return e.strerror if e.filename is None else f"{e.filename}: {e.strerror}"
    if isinstance(e, (CLIError, ValueError, TypeError, OSError)):
        return str(e)  # worded for the user where raised
    return f"{type(e).__name__}: {e} (TOKENSPEED_DEBUG=1 shows the traceback)"


def _fail(message: str, status: int) -> int:
    if os.environ.get("TOKENSPEED_DEBUG", "") not in ("", "0"):
        traceback.print_exc()
    # one line, even for a library's message spread over several
    print("tokenspeed: " + " ".join(message.split()), file=sys.stderr)
    return status


def _log_probs(path: str) -> list[tuple[int, list[float]]]:
    out = []
    for n, record in _read_records(path):
        value = record.get("log_probs")
        if not isinstance(value, list) or not all(isinstance(x, (int, float)) for x in value):
            raise CLIError(f"{path}: line {n} has no list of numbers 'log_probs'")
        out.append((n, value))
    return out


def compare(args: argparse.Namespace) -> int:
    from .metrics import METRICS, agreement

    a, b = _log_probs(args.reference), _log_probs(args.candidate)
    if len(a) != len(b):
        raise CLIError(f"{args.reference} has {len(a)} scored lines, {args.candidate} {len(b)}")
    for (na, ra), (nb, rb) in zip(a, b):
        if len(ra) != len(rb):
            raise CLIError(f"line {na} of {args.reference} has {len(ra)} log-probs, line {nb} "
                           f"of {args.candidate} {len(rb)}")
    result = agreement([r for _, r in a], [r for _, r in b])
    print(f"{len(a)} sequences, {result['tokens']} tokens")
    for key in METRICS:
        print(f"{key:>22}: {result[key]:.6g}")
    ranked = sorted(range(len(a)), key=lambda i: -(result["per_sequence"][i]["max_abs_diff"]
                                                    if a[i][1] else -1.0))
    for i in ranked[:max(args.worst, 0)]:
        if a[i][1]:
            print(f"line {a[i][0]}: max |delta| {result['per_sequence'][i]['max_abs_diff']:.6g}, "
                  f"mean {result['per_sequence'][i]['mean_abs_diff']:.6g}")
    return 0


def serve(args: argparse.Namespace) -> int:
    try:
        from .server import run_server
    except ImportError as e:
        raise CLIError(f"tokenspeed serve needs the server extra ({e.name} is missing): "
                       f"pip install 'tokenspeed[server]'") from None
    model_dir = Path(args.model) if args.model else builtin_model_dir()
    return run_server(lambda: _load_engine(model_dir, args), model_dir, host=args.host,
                      port=args.port, api_key=args.api_key,
                      max_request_bytes=args.max_request_bytes)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"compare": compare, "serve": serve, "score": score}
        return commands[args.command](args)
    except BrokenPipeError:
        # the reader went away (`tokenspeed score x.jsonl | head`): stop quietly, as Unix
        # tools do; point stdout at devnull so the interpreter's final flush cannot raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - the user gets one line, not a traceback
        return _fail(f"error: {_describe(e)}", 1)
