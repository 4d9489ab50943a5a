"""Scheduler overhead: schedule + complete for 4,096 queued requests with a warm prefix cache.

Workload, GRPO-shaped: 64 prompts x 64 completions, prompt lengths uniform in
[64, 2048), completion lengths uniform in [16, 1024), random token ids. The cache is
warmed (untimed) by scoring one request per prompt, so each of the 4,096 requests hits
its prompt's full pages. Timed: the loop an engine runs, schedule() + complete() until
the queue is empty, alone and with the 8 batch arrays wrapped by torch.frombuffer.

Also, GRPO submitted cold (--grpo-prompts prompts x 8 completions added at once, empty
cache, the issue-6 shapes: prompts uniform in [128, 2048], completions log-normal with
median 512 capped at 4096): how many tokens the batches compute against the tokens
submitted, as siblings share their prompt's pages while in flight.

Peer: the forward pass each batch feeds, at its floor (2 * params * tokens at the bf16
matmul rate measured on the H200, CRAFT.md), for the configs in shapes.py. The scheduler
must be small next to it; the ratio is printed. CPU-only; median of --reps runs.

    python bench/bench_scheduler.py [--requests 4096] [--page-size 16] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import MODELS  # noqa: E402

import tokenspeed_ext as tse  # noqa: E402

H200_BF16_MATMUL_FLOPS = 758e12  # CRAFT.md, bf16 8192^3 matmul on the lent H200
ARRAYS = ("input_ids", "positions", "slot_mapping", "page_table", "cu_seqlens_q", "kv_lens",
          "score_rows", "score_targets")


def workload(num_requests: int, group: int, seed: int = 0) -> tuple[list, list]:
    """(warm-up requests, one per prompt; timed requests), each (tokens, logprob_start)."""
    g = torch.Generator().manual_seed(seed)
    warm, timed = [], []
    for _ in range(num_requests // group):
        prompt = torch.randint(0, 151_936, (int(torch.randint(64, 2048, (1,), generator=g)),),
                               generator=g).tolist()
        for i in range(group + 1):
            completion = torch.randint(0, 151_936, (int(torch.randint(16, 1024, (1,), generator=g)),),
                                       generator=g).tolist()
            (warm if i == 0 else timed).append((prompt + completion, len(prompt) - 1))
    return warm, timed


def run_queue(s, wrap: bool) -> tuple[int, int]:
    """schedule() + complete() until idle; returns (batches, tokens)."""
    batches = tokens = 0
    while (b := s.schedule()) is not None:
        if wrap:
            for name in ARRAYS:
                a = getattr(b, name)
                if len(a):
                    torch.frombuffer(a, dtype=torch.int32)
        batches += 1
        tokens += b.num_tokens
        s.complete(b)
    return batches, tokens


def one_run(args, warm, timed, wrap: bool) -> dict:
    s = tse.Scheduler(args.num_pages, args.page_size, args.max_batch_tokens,
                      args.max_batch_requests)
    for rid, (tokens, start) in enumerate(warm):
        s.add(-1 - rid, tokens, start)
    run_queue(s, wrap=False)
    hits_before = s.stats()["prefix_hit_tokens"]
    t0 = time.perf_counter()
    for rid, (tokens, start) in enumerate(timed):
        s.add(rid, tokens, start)
    t1 = time.perf_counter()
    batches, tokens = run_queue(s, wrap)
    t2 = time.perf_counter()
    st = s.stats()
    return dict(add_s=t1 - t0, loop_s=t2 - t1, batches=batches, tokens=tokens,
                hit_tokens=st["prefix_hit_tokens"] - hits_before, evicted=st["evicted_pages"])


def grpo_workload(num_prompts: int, group: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_prompts):
        prompt = torch.randint(0, 151_936, (int(torch.randint(128, 2049, (1,), generator=g)),),
                               generator=g).tolist()
        for _ in range(group):
            n = min(4096, max(1, int(torch.empty(1).log_normal_(6.238, 0.7, generator=g))))
            out.append((prompt + torch.randint(0, 151_936, (n,), generator=g).tolist(),
                        len(prompt) - 1))
    return out


def grpo_cold_run(args, requests, prefix_cache: bool) -> dict:
    s = tse.Scheduler(args.num_pages, args.page_size, args.max_batch_tokens,
                      args.max_batch_requests, prefix_cache)
    for rid, (tokens, start) in enumerate(requests):
        s.add(rid, tokens, start)
    batches = tokens = peak_owned = 0
    t0 = time.perf_counter()
    while (b := s.schedule()) is not None:
        peak_owned = max(peak_owned, s.stats()["owned_pages"])
        batches += 1
        tokens += b.num_tokens
        s.complete(b)
    loop = time.perf_counter() - t0
    st = s.stats()
    return dict(loop_s=loop, batches=batches, tokens=tokens, peak_owned=peak_owned,
                hit=st["prefix_hit_tokens"], same_batch=st["same_batch_hit_tokens"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4096)
    p.add_argument("--group", type=int, default=64, help="completions per prompt")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=16384)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-batch-requests", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--grpo-prompts", type=int, default=64)
    args = p.parse_args()

    warm, timed = workload(args.requests, args.group)
    total_tokens = sum(len(t) for t, _ in timed)
    print(f"{len(timed)} requests, {total_tokens} tokens (mean {total_tokens / len(timed):.0f}), "
          f"page_size {args.page_size}, {args.num_pages} pages, max_batch_tokens "
          f"{args.max_batch_tokens}, median of {args.reps} runs")
    results = {}
    for wrap in (False, True):
        runs = [one_run(args, warm, timed, wrap) for _ in range(args.reps)]
        r = runs[0]
        loop = statistics.median(x["loop_s"] for x in runs)
        add = statistics.median(x["add_s"] for x in runs)
        label = "schedule+complete" + (" + 8x torch.frombuffer" if wrap else "")
        per_batch = loop / r["batches"] * 1e6
        results[wrap] = per_batch
        print(f"{label:45s} {per_batch:8.1f} us/batch  {loop / len(timed) * 1e6:6.2f} us/request  "
              f"({r['batches']} batches, {r['tokens'] / r['batches']:.0f} tokens/batch)")
    print(f"{'add() from Python lists':45s} {add / len(timed) * 1e6:8.2f} us/request")
    print(f"prefix-cache hit: {r['hit_tokens']} of {total_tokens} tokens "
          f"({r['hit_tokens'] / total_tokens:.0%}), {r['evicted']} pages evicted")
    grpo = grpo_workload(args.grpo_prompts, 8)
    submitted = sum(len(t) for t, _ in grpo)
    print(f"GRPO cold, {args.grpo_prompts} prompts x 8 completions added at once, "
          f"{submitted} tokens:")
    for on in (True, False):
        g = grpo_cold_run(args, grpo, on)
        print(f"  prefix cache {'on ' if on else 'off'}: {g['tokens']} tokens computed "
              f"({g['tokens'] / submitted:.0%} of submitted) in {g['batches']} batches, "
              f"{g['hit']} hit tokens ({g['same_batch']} in the writer's batch), "
              f"peak {g['peak_owned']} pages held, {g['loop_s'] / g['batches'] * 1e6:.0f} us/batch")
    tokens_per_batch = r["tokens"] / r["batches"]
    for name, m in MODELS.items():
        fwd_us = 2 * m["params"] * tokens_per_batch / H200_BF16_MATMUL_FLOPS * 1e6
        print(f"vs forward floor {name:14s} {fwd_us:9.0f} us/batch: scheduler is "
              f"{results[True] / fwd_us:.2%} of it")


if __name__ == "__main__":
    main()
