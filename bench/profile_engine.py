"""Where the engine's time goes: torch.profiler over one compute_log_probs call.

    python bench/profile_engine.py --model qwen2.5-1.5b --workload uniform

Builds the random checkpoint like bench_scoring.py, warms up, then prints the kernels
(and CPU ops) sorted by self CUDA time, plus wall time and tokens/s of the profiled call.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import build_checkpoint, make_workload  # noqa: E402
from shapes import MODELS  # noqa: E402


def print_gaps(prof, n: int) -> None:
    """Device idle time within the profiled call, from the trace's kernel and copy spans."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            events = json.load(trace)["traceEvents"]
    call = next(e for e in events if e.get("name") == "compute_log_probs" and "dur" in e
                and e.get("cat") == "user_annotation")
    begin, end = call["ts"], call["ts"] + call["dur"]
    device = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
                    and begin <= e["ts"] <= end)
    # host ops and (with_stack) Python functions inside the call
    host = [e for e in events if e.get("cat") in ("cpu_op", "python_function") and "dur" in e
            and begin <= e["ts"] and e["ts"] + e["dur"] <= end and e["dur"] < call["dur"]]
    busy, gaps, last = 0.0, [], device[0][0]
    for start, stop in device:
        if start > last:
            gaps.append((start - last, last))
        busy += max(0.0, stop - max(start, last))
        last = max(last, stop)
    print(f"call {(end - begin) / 1e3:.1f} ms: device busy {busy / 1e3:.1f} ms; idle before "
          f"the first kernel {(device[0][0] - begin) / 1e3:.1f} ms, after the last "
          f"{(end - last) / 1e3:.1f} ms, between kernels {sum(g for g, _ in gaps) / 1e3:.1f} "
          f"ms in {len(gaps)} gaps ({sum(g for g, _ in gaps if g > 50) / 1e3:.1f} ms in "
          f"{sum(1 for g, _ in gaps if g > 50)} over 50 us)")
    for gap, at in sorted(gaps, reverse=True)[:n]:
        # the innermost host spans covering the gap: what the host was doing meanwhile
        covering = sorted((e for e in host if e["ts"] <= at and e["ts"] + e["dur"] >= at + gap),
                          key=lambda e: e["dur"])
        names = " < ".join(e["name"].split("/")[-1][:60] for e in covering[:4])
        print(f"  {gap:8.0f} us at +{(at - begin) / 1e3:7.1f} ms; host: {names}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--workload", nargs="+", default=["uniform", "grpo"])
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                    help="profile calls with top_logprobs=K (tensor outputs)")
    ap.add_argument("--gaps", type=int, default=0, metavar="N",
                    help="also print where the device idles in the call: before its first "
                         "kernel, after its last, and the N longest gaps between kernels "
                         "with the host ops then running")
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
                                                    torch.profiler.ProfilerActivity.CUDA],
                                        with_stack=bool(args.gaps)) as prof:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.profiler.record_function("compute_log_probs"):
                    eng.compute_log_probs(seqs, **rich)
                    torch.cuda.synchronize()
                secs = time.perf_counter() - t0
            print(f"\n## {args.model} / {workload}: {n_tokens} tokens in {secs:.3f} s "
                  f"(profiled: {n_tokens / secs:,.0f} tok/s); stats {eng.stats()}")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                            max_name_column_width=60))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                            max_name_column_width=60))
            if args.gaps:
                print_gaps(prof, args.gaps)


if __name__ == "__main__":
    main()
