"""Fused log-prob gather vs eager PyTorch, a torch.compile'd logsumexp-gather and the floor;
with --rich, the rich outputs (top_logprobs=20; top-k 50 + top-p 0.95; top-p 0.95 alone; 8
requested ids a position) vs the plain kernel and torch.compile of the straightforward torch
code.

Floor: the bf16 logits read once at the device-to-device copy rate measured in this run.
Columns: ours (a call on an idle device, with the targets' range check: a host round
trip), no chk (without the check), b2b (no check, calls enqueued back to back as the
engine enqueues them: the kernels' own time, without each call's launch latency).
bf16 logits, random (never zeros), inputs rotated so that each timed call reads memory
rather than L2.

    python bench/bench_logprobs.py [--t 1024 4096 16384] [--v 151936 32000]
    python bench/bench_logprobs.py --rich [--t 16384] [--v 151936]   # also on CPU:
    python bench/bench_logprobs.py --rich --device cpu --t 64 --v 4096
    python bench/bench_logprobs.py --rich --profile --t 16384 --reps 5   # where time goes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import back_to_back_ms, copy_bandwidth, median_ms, timed_ms  # noqa: E402

import tokenspeed_ext as tse  # noqa: E402
from tokenspeed.layers.sampler_filters import (RowOptions, candidate_count, finish_rows,  # noqa: E402,E501
                                               gather_token_logits, merge_state)


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


def ours_rich(x, t, opts, ids=None):
    """The head's computation on one piece of whole rows (sampler_filters.py)."""
    if opts.needs_candidates:
        parts, vals, cand = tse.logprob_topk_partials(x, t, 0, 1.0, opts.candidates,
                                                      validate=False)
    else:
        parts, vals, cand = tse.logprob_partials(x, t, 0, 1.0, validate=False), None, None
    token_x = None if ids is None else gather_token_logits(x, 0, ids, 1.0)

    def mass_above(rows, thresholds, ref_m):
        return tse.logprob_mass_above(x.index_select(0, rows), 1.0, thresholds, ref_m)

    return finish_rows(merge_state(parts[None]), vals, cand, token_x, opts, mass_above)


def torch_top_logprobs(x, t, k: int):
    logp = torch.log_softmax(x.float(), -1)
    top = logp.topk(k, -1)
    return logp.gather(-1, t[:, None]).squeeze(-1), top.values, top.indices


def torch_top_k_top_p(x, t, k: int, p: float):
    xf = x.float()
    srt, idx = xf.sort(-1, descending=True)
    srt = srt.masked_fill(torch.arange(xf.shape[-1], device=x.device) >= k, -torch.inf)
    probs = srt.softmax(-1)
    srt = srt.masked_fill(probs.cumsum(-1) - probs >= p, -torch.inf)
    logp = torch.full_like(xf, -torch.inf).scatter(-1, idx, srt).log_softmax(-1)
    return logp.gather(-1, t[:, None]).squeeze(-1)


def torch_token_ids(x, t, ids):
    logp = torch.log_softmax(x.float(), -1)
    return logp.gather(-1, t[:, None]).squeeze(-1), logp.gather(-1, ids)


def profile(name: str, fn, dev: str, reps: int = 5) -> None:
    """Where a case's time goes: torch.profiler's table of device kernels and host ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    fn(0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for i in range(reps):
            fn(i)
        if dev == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(f"--- profile {name} ({reps} calls)")
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


def rich(args) -> None:
    """Each case: ours, the plain kernel and torch.compile of the torch code, as ratios."""
    dev = args.device
    header = (f"{'T':>6} {'V':>7} {'case':<14} | {'ours ms':>8} {'plain':>8} {'x plain':>7} | "
              f"{'compile':>8} {'x ours':>6}")
    rows = [header]
    print(header, flush=True)
    for v in args.v:
        for t in args.t:
            gen = torch.Generator(dev).manual_seed(t + v)
            sets = 1 if dev == "cpu" else max(1, min(4, -(-(512 << 20) // (t * v * 2))))
            xs = [torch.randn(t, v, device=dev, generator=gen).mul_(3).to(torch.bfloat16)
                  for _ in range(sets)]
            ts = [torch.randint(0, v, (t,), device=dev, generator=gen) for _ in range(sets)]
            ids = torch.randint(0, v, (t, 8), device=dev, generator=gen)
            zeros = torch.zeros(t, dtype=torch.int64, device=dev)
            ones = torch.ones(t, device=dev)

            def opts(k, p, top, filtered):
                # the candidates the engine's head asks for with these settings; built
                # once, as the head gets a batch's options
                cands = candidate_count(top, k, filtered and k == 0)
                return RowOptions(zeros + k, ones * p, ones * 0, top, None, cands, filtered)

            top20, k50p95, p95, raw = (opts(0, 1.0, 20, False), opts(50, 0.95, 0, True),
                                       opts(0, 0.95, 0, True), opts(0, 1.0, 0, False))
            cases = {
                "top_logprobs20": (lambda i: ours_rich(xs[i % sets], ts[i % sets], top20),
                                   torch.compile(torch_top_logprobs, dynamic=True),
                                   lambda i, f: f(xs[i % sets], ts[i % sets], 20)),
                "topk50_topp95": (lambda i: ours_rich(xs[i % sets], ts[i % sets], k50p95),
                                  torch.compile(torch_top_k_top_p, dynamic=True),
                                  lambda i, f: f(xs[i % sets], ts[i % sets], 50, 0.95)),
                # top-p alone, a nucleus beyond the 64 candidates: the radix search's four
                # 256-threshold passes (the binned mass kernel) and one more pass
                "topp95": (lambda i: ours_rich(xs[i % sets], ts[i % sets], p95),
                           torch.compile(torch_top_k_top_p, dynamic=True),
                           lambda i, f: f(xs[i % sets], ts[i % sets], v, 0.95)),
                "ids8": (lambda i: ours_rich(xs[i % sets], ts[i % sets], raw, ids),
                         torch.compile(torch_token_ids, dynamic=True),
                         lambda i, f: f(xs[i % sets], ts[i % sets], ids)),
            }
            plain = timed_ms(lambda i: tse.logprobs(xs[i % sets], ts[i % sets], validate=False),
                             dev, args.reps)
            for name, (ours, peer, call) in cases.items():
                if args.profile:
                    profile(name, ours, dev)
                o = timed_ms(ours, dev, args.reps)
                c = timed_ms(lambda i: call(i, peer), dev, args.reps)
                line = (f"{t:>6} {v:>7} {name:<14} | {o:8.3f} {plain:8.3f} {o / plain:7.2f} | "
                        f"{c:8.3f} {c / o:6.2f}")
                rows.append(line)
                print(line, flush=True)
            del xs, ts
    print("\n".join(["", "summary (targets: top_logprobs20 <= 1.25x plain, topk50_topp95 <= 2x, "
                     "ids8 <= 1.1x)"] + rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--v", type=int, nargs="+", default=[151936, 32000])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rich", action="store_true", help="the rich-output cases instead")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true",
                    help="with --rich: print each case's torch.profiler table first")
    args = ap.parse_args()
    if args.rich:
        return rich(args)
    compiled = torch.compile(lse_gather, dynamic=True)
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"copy bandwidth {bw / 1e12:.2f} TB/s")
    header = (f"{'T':>6} {'V':>7} {'ent':>3} | {'ours ms':>8} {'floor':>7} {'x floor':>7} | "
              f"{'no chk':>8} {'x floor':>7} | {'b2b':>8} {'x floor':>7} | {'eager':>8} "
              f"{'x ours':>6} | {'compile':>8} {'x ours':>6}")
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
                # as the engine calls it: without the targets' range check (a host round trip)
                bare = median_ms(lambda i: tse.logprobs(xs[i % sets], ts[i % sets],
                                                        return_entropy=ent, validate=False),
                                 args.reps)
                # the same, enqueued back to back: the kernels' own time, no launch gaps
                b2b = back_to_back_ms(lambda i: tse.logprobs(xs[i % sets], ts[i % sets],
                                                             return_entropy=ent, validate=False),
                                      args.reps)
                e = median_ms(lambda i: eager(xs[i % sets], ts[i % sets], ent), 10, 2)
                c = median_ms(lambda i: compiled(xs[i % sets], ts[i % sets], ent), args.reps)
                line = (f"{t:>6} {v:>7} {int(ent):>3} | {ours:8.3f} {floor:7.3f} "
                        f"{ours / floor:7.2f} | {bare:8.3f} {bare / floor:7.2f} | {b2b:8.3f} "
                        f"{b2b / floor:7.2f} | {e:8.3f} "
                        f"{e / ours:6.1f} | {c:8.3f} "
                        f"{c / ours:6.2f}")
                rows.append(line)
                print(line, flush=True)
            del xs, ts
            torch.cuda.empty_cache()
    print("\n".join(["", "summary"] + rows))


if __name__ == "__main__":
    main()
