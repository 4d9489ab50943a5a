"""What update_weights' finiteness check costs next to the writes it guards.

For every tensor of a model's HF state dict (random bf16 values at the shapes of a real
config, on the device), update_weights reads it once for the check (``first_non_finite``:
a reduction per tensor, one host round trip per device) and once for the write
(``param.copy_(t)``). This times both over the whole state dict, in the same run.

    python bench/bench_update_weights.py [--models qwen2.5-1.5b qwen2.5-7b] [--device cuda]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import MODELS  # noqa: E402

from tokenspeed.models.loader import first_non_finite  # noqa: E402


def state_shapes(m: dict) -> list[tuple[int, ...]]:
    """The HF tensor shapes of one model (q/k/v, o, gate/up/down, norms, embed, head)."""
    h, i, d = m["hidden"], m["intermediate"], m["head_dim"]
    q, kv = m["heads"] * d, m["kv_heads"] * d
    layer = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i), (h,), (h,)]
    return [(m["vocab"], h), (m["vocab"], h), (h,)] + layer * m["layers"]


def timed_s(fn, device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[reps // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-1.5b", "qwen2.5-7b"],
                        choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{'model':>14} {'GB':>6} {'write s':>8} {'check s':>8} {'check/write':>12} "
          f"{'write GB/s':>11}")
    for name in args.models:
        m = dict(MODELS[name])
        if device.type == "cpu":  # the CPU run checks the code path at small widths
            m.update(layers=2, hidden=256, intermediate=512, vocab=4096, heads=4,
                     kv_heads=2, head_dim=64)
        shapes = state_shapes(m)
        gen = torch.Generator(device=device).manual_seed(0)
        src = [torch.randn(s, generator=gen, device=device, dtype=torch.bfloat16)
               for s in shapes]
        dst = [torch.empty_like(t) for t in src]
        nbytes = sum(t.numel() * t.element_size() for t in src)

        def write() -> None:
            for d, s in zip(dst, src):
                d.copy_(s)

        def check() -> None:
            assert first_non_finite(src) is None

        w, c = timed_s(write, device, args.reps), timed_s(check, device, args.reps)
        print(f"{name:>14} {nbytes / 1e9:6.2f} {w:8.4f} {c:8.4f} {c / w:12.2f} "
              f"{nbytes / 1e9 / w:11.1f}")
        del src, dst


if __name__ == "__main__":
    main()
