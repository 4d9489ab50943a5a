"""The log-prob head against the bare GEMM and the fused linear cross-entropy peers, in one
run: time (CUDA-event median), extra peak memory and error against fp64 of

- ``gemm bf16``: hidden @ W^T with bf16 out, the time the head is measured against;
- ``gemm fp32 out``: the same GEMM writing its fp32 accumulator (what the head uses);
- ``ours fused``: the engine's default head on CUDA, head_logprob_partials (the (m, s, w,
  t) partials taken in the GEMM's epilogue, no logits written);
- ``ours lean``: the head on vocabulary chunks of 32768 (fp32 logits, their partials
  merged), the default before the fused kernel;
- ``ours rows``: the head on whole rows in bounded blocks;
- ``liger``: Liger-Kernel's fused linear cross entropy (reduction none), if importable;
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy`` (reduction none), if importable.

    python bench/bench_head.py [--t 16384] [--v 151936] [--hidden 1536 3584]

The error is max and mean |log p(target) - fp64| over --check rows.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import median_ms  # noqa: E402

from tokenspeed.config import LEAN_VOCAB_CHUNK_CUDA  # noqa: E402
from tokenspeed.layers.logprob_head import HeadOptions, LogprobHead  # noqa: E402


def heads(vocab: int, hidden: int, weight: torch.Tensor) -> dict[str, LogprobHead]:
    out = {}
    for name, chunk, fused in (("ours fused", LEAN_VOCAB_CHUNK_CUDA, True),
                               ("ours lean", LEAN_VOCAB_CHUNK_CUDA, False),
                               ("ours rows", None, False)):
        head = LogprobHead(vocab, hidden, options=HeadOptions(vocab_chunk=chunk, fused=fused))
        head.weight.data = weight
        out[name] = head
    return out


def peers() -> dict[str, Callable]:
    """The fused linear cross-entropy peers that import here: (h, W, t) -> log p(t)."""
    out: dict[str, Callable] = {}
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss)
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        out["liger"] = lambda h, w, t: -liger(w, h, t)
    except ImportError as e:
        print(f"# liger not run: {e}")
    try:
        from cut_cross_entropy import linear_cross_entropy
        out["cce"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none")
    except ImportError as e:
        print(f"# cce not run: {e}")
    return out


def fp64_logprobs(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    logits = h.double() @ w.double().t()
    return torch.log_softmax(logits, -1).gather(1, t[:, None])[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--t", type=int, default=16384)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1536, 3584])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--check", type=int, default=256, help="rows checked against fp64")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  T={args.t} V={args.v}")
    header = (f"{'H':>5} {'case':<14} | {'ms':>8} {'x gemm':>7} {'TFLOP/s':>8} | "
              f"{'extra GiB':>9} | {'max err':>9} {'mean err':>9}")
    rows = [header]
    print(header, flush=True)
    others = peers()
    for hidden in args.hidden:
        gen = torch.Generator("cuda").manual_seed(hidden)
        # logits of spread ~3, as a trained head's
        w = (torch.randn(args.v, hidden, device="cuda", generator=gen)
             * (3 / hidden ** 0.5)).to(torch.bfloat16)
        h = torch.randn(args.t, hidden, device="cuda", generator=gen).to(torch.bfloat16)
        t = torch.randint(0, args.v, (args.t,), device="cuda", generator=gen)
        want = fp64_logprobs(h[:args.check], w, t[:args.check])
        cases: dict[str, Callable] = {
            "gemm bf16": lambda: torch.mm(h, w.t()),
            "gemm fp32 out": lambda: torch.mm(h, w.t(), out_dtype=torch.float32),
        }
        for name, head in heads(args.v, hidden, w).items():
            cases[name] = (lambda head: lambda: head(h, t, 1.0, False)[0])(head)
        for name, fn in others.items():
            cases[name] = (lambda fn: lambda: fn(h, w, t))(fn)
        flops = 2 * args.t * args.v * hidden
        base = None
        with torch.inference_mode():
            for name, fn in cases.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated()
                out = fn()
                torch.cuda.synchronize()
                extra = (torch.cuda.max_memory_allocated() - held) / 2**30
                if out.dim() == 1:  # log-probs: their error against fp64
                    err = (out[:args.check].double() - want).abs()
                    errs = f"{err.max().item():9.2e} {err.mean().item():9.2e}"
                else:
                    errs = f"{'-':>9} {'-':>9}"
                del out
                ms = median_ms(lambda i: fn(), reps=args.reps)
                base = base or ms
                line = (f"{hidden:>5} {name:<14} | {ms:8.3f} {ms / base:7.3f} "
                        f"{flops / ms / 1e9:8.1f} | {extra:9.3f} | {errs}")
                rows.append(line)
                print(line, flush=True)
    print("\n".join(["", "summary (issue goal: the head at most 1.05x the bf16 GEMM, error "
                     "within 1e-4 of fp64, extra memory O(T))"] + rows))


if __name__ == "__main__":
    main()
