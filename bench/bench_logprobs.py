"""Fused log-prob gather vs eager PyTorch, a torch.compile'd logsumexp-gather and the floor.

Floor: the bf16 logits read once at the device-to-device copy rate measured in this run.
bf16 logits, random (never zeros), inputs rotated so that each timed call reads memory
rather than L2.

    python bench/bench_logprobs.py [--t 1024 4096 16384] [--v 151936 32000]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import copy_bandwidth, median_ms  # noqa: E402

import tokenspeed_ext as tse  # noqa: E402


def eager(x, t, entropy):
    logp = torch.log_softmax(x.float(), -1)
    lp = logp.gather(-1, t[:, None]).squeeze(-1)
    if not entropy:
        return lp
    return lp, -(logp.exp() * logp).sum(-1)


def lse_gather(x, t, entropy: bool):
    xf = x.float()
    lse = torch.logsumexp(xf, -1)
    lp = xf.gather(-1, t[:, None]).squeeze(-1) - lse
    if not entropy:
        return lp
    p = torch.softmax(xf, -1)
    return lp, lse - (p * xf).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--v", type=int, nargs="+", default=[151936, 32000])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    compiled = torch.compile(lse_gather, dynamic=True)
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"copy bandwidth {bw / 1e12:.2f} TB/s")
    header = (f"{'T':>6} {'V':>7} {'ent':>3} | {'ours ms':>8} {'floor':>7} {'x floor':>7} | "
              f"{'eager':>8} {'x ours':>6} | {'compile':>8} {'x ours':>6}")
    rows = [header]
    print(header, flush=True)
    for v in args.v:
        for t in args.t:
            nbytes = t * v * 2
            sets = max(1, min(8, -(-(512 << 20) // nbytes)))
            gen = torch.Generator("cuda").manual_seed(t + v)
            xs = [torch.randn(t, v, device="cuda", generator=gen).mul_(3).to(torch.bfloat16)
                  for _ in range(sets)]
            ts = [torch.randint(0, v, (t,), device="cuda", generator=gen) for _ in range(sets)]
            floor = nbytes / bw * 1e3
            for ent in (False, True):
                ours = median_ms(lambda i: tse.logprobs(xs[i % sets], ts[i % sets],
                                                        return_entropy=ent), args.reps)
                e = median_ms(lambda i: eager(xs[i % sets], ts[i % sets], ent), 10, 2)
                c = median_ms(lambda i: compiled(xs[i % sets], ts[i % sets], ent), args.reps)
                line = (f"{t:>6} {v:>7} {int(ent):>3} | {ours:8.3f} {floor:7.3f} "
                        f"{ours / floor:7.2f} | {e:8.3f} {e / ours:6.1f} | {c:8.3f} "
                        f"{c / ours:6.2f}")
                rows.append(line)
                print(line, flush=True)
            del xs, ts
            torch.cuda.empty_cache()
    print("\n".join(["", "summary"] + rows))


if __name__ == "__main__":
    main()
