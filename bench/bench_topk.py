"""The top-k log-prob op's kernels against the plain op in the same run: the time of
``logprob_topk_partials`` (the partials plus each row's k largest x) over ``logprobs``,
on an idle device and enqueued back to back, bf16 logits rotated past L2.

    python bench/bench_topk.py [--t 16384] [--v 151936] [--k 20 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import back_to_back_ms, median_ms  # noqa: E402

import tokenspeed_ext as tse  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=16384)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--k", type=int, nargs="+", default=[20, 64])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    sets = max(1, min(4, -(-(512 << 20) // (args.t * args.v * 2))))
    xs = [torch.randn(args.t, args.v, device="cuda", generator=gen).mul_(3).to(torch.bfloat16)
          for _ in range(sets)]
    ts = [torch.randint(0, args.v, (args.t,), device="cuda", generator=gen) for _ in range(sets)]
    fns = {"plain": lambda i: tse.logprobs(xs[i % sets], ts[i % sets], validate=False)}
    for k in args.k:
        fns[f"top-k {k}"] = lambda i, k=k: tse.logprob_topk_partials(
            xs[i % sets], ts[i % sets], 0, 1.0, k, validate=False)
    times = {name: (median_ms(fn, args.reps), back_to_back_ms(fn, args.reps))
             for name, fn in fns.items()}
    idle, b2b = times["plain"]
    print(f"T={args.t} V={args.v} bf16: ms on an idle device / back to back, x plain")
    for name, (a, b) in times.items():
        print(f"  {name:<9} {a:7.3f} / {b:7.3f}   {a / idle:5.3f}x / {b / b2b:5.3f}x")


if __name__ == "__main__":
    main()
