"""Where the engine's time goes: torch.profiler over one compute_log_probs call.

    python bench/profile_engine.py --model qwen2.5-1.5b --workload uniform

Builds the random checkpoint like bench_scoring.py, warms up, then prints the kernels
(and CPU ops) sorted by self CUDA time, plus wall time and tokens/s of the profiled call.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import build_checkpoint, make_workload  # noqa: E402
from shapes import MODELS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--workload", nargs="+", default=["uniform", "grpo"])
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                    help="profile calls with top_logprobs=K (tensor outputs)")
    args = ap.parse_args()
    from tokenspeed import Engine

    root = args.root or Path(tempfile.mkdtemp(prefix="tokenspeed-prof-"))
    path = root / args.model
    if not path.exists():
        build_checkpoint(args.model, root)
    vocab = MODELS[args.model]["hf_config"]["vocab_size"]
    with Engine(str(path), device="cuda", dtype="bfloat16", kv_cache_tokens=65536) as eng:
        rich = dict(top_logprobs=args.top_logprobs, return_tensors=True) \
            if args.top_logprobs else {}
        eng.compute_log_probs(make_workload("uniform", vocab, seed=1)[:4], **rich)
        for workload in args.workload:
            seqs = make_workload(workload, vocab, seed=2)
            n_tokens = sum(len(s["prompt_token_ids"]) + len(s["completion_token_ids"])
                           for s in seqs)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                eng.compute_log_probs(seqs, **rich)
                torch.cuda.synchronize()
                secs = time.perf_counter() - t0
            print(f"\n## {args.model} / {workload}: {n_tokens} tokens in {secs:.3f} s "
                  f"(profiled: {n_tokens / secs:,.0f} tok/s); stats {eng.stats()}")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                            max_name_column_width=60))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                            max_name_column_width=60))


if __name__ == "__main__":
    main()
