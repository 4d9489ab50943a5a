"""The host's work in a compute_log_probs call before its first batch runs (validating the
sequences and options, queueing them in the scheduler): time the device idles at the
start of every call. Runs the call on the CPU with the built-in tiny model and stops it
where the first batch would run, so it measures only that work.

    python bench/bench_host.py [--grpo-prompts 64] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scoring  # noqa: E402
from bench_scoring import MODELS, build_checkpoint, make_workload  # noqa: E402


class _FirstBatch(Exception):
    pass


def _stop(*args, **kwargs):
    raise _FirstBatch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("/tmp/ckpt_cpu"))
    ap.add_argument("--grpo-prompts", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from tokenspeed import Engine
    from tokenspeed.runner import ModelRunner

    bench_scoring.DEVICE = "cpu"
    path = args.root / "tiny"
    if not path.exists():
        build_checkpoint("tiny", args.root)
    vocab = MODELS["tiny"]["hf_config"]["vocab_size"]
    seqs = make_workload("grpo", vocab, grpo_prompts=args.grpo_prompts)
    n_tokens = sum(len(s["prompt_token_ids"]) + len(s["completion_token_ids"]) for s in seqs)
    run = ModelRunner.run
    ModelRunner.run = _stop
    try:
        with Engine(str(path), device="cpu", dtype="float32", kv_cache_tokens=65536) as eng:
            secs = []
            for _ in range(args.reps + 1):
                t0 = time.perf_counter()
                try:
                    eng.compute_log_probs(seqs)
                except _FirstBatch:
                    pass
                secs.append(time.perf_counter() - t0)
    finally:
        ModelRunner.run = run
    ms = statistics.median(secs[1:]) * 1e3
    print(f"{len(seqs)} GRPO sequences, {n_tokens} tokens: {ms:.1f} ms before the first "
          f"batch ({ms * 1e6 / n_tokens:.1f} ns a token; median of {args.reps})")


if __name__ == "__main__":
    main()
