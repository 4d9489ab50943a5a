"""End to end: the engine with the attention kernel's K/V loads as chosen (TMA boxes where
pages allow, bench/bench_attention.py) against the same engine with every load a cp.async
gather (TOKENSPEED_ATTENTION_KV_LOAD=cp_async), in alternating calls on one engine. The
prefix cache is flushed before each call, so every call computes the same tokens and the
pages come from the allocator as in a fresh run.

    python bench/bench_kv_load.py [--model qwen2.5-1.5b] [--kv-tokens 65536 262144] [--pairs 3]
    python bench/bench_kv_load.py --model tiny --device cpu --kv-tokens 8192 --pairs 1 --grpo-prompts 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scoring  # noqa: E402
from bench_scoring import MODELS, build_checkpoint, make_workload  # noqa: E402

ENV = "TOKENSPEED_ATTENTION_KV_LOAD"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--root", type=Path, default=Path("/tmp/ckpt"))
    ap.add_argument("--kv-tokens", type=int, nargs="+", default=[65536, 262144])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--grpo-prompts", type=int, default=64)
    args = ap.parse_args()
    from tokenspeed import Engine

    bench_scoring.DEVICE = args.device
    path = args.root / args.model
    if not path.exists():
        build_checkpoint(args.model, args.root)
    vocab = MODELS[args.model]["hf_config"]["vocab_size"]
    seqs = make_workload("grpo", vocab, grpo_prompts=args.grpo_prompts)
    n_tokens = sum(len(s["prompt_token_ids"]) + len(s["completion_token_ids"]) for s in seqs)
    warm = make_workload("grpo", vocab, seed=1)[:4]
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"# {torch.cuda.get_device_name() if cuda else args.device}  torch "
          f"{torch.__version__}  {args.model} grpo ({n_tokens} tokens)")
    saved = os.environ.pop(ENV, None)
    try:
        for kv in args.kv_tokens:
            with Engine(str(path), device=args.device, dtype="bfloat16",
                        kv_cache_tokens=kv) as eng:
                eng.compute_log_probs(warm)
                secs = {"auto": [], "cp_async": []}
                outs = {}
                for _ in range(args.pairs):
                    for mode in secs:
                        os.environ[ENV] = mode
                        eng.flush_cache()
                        sync()
                        t0 = time.perf_counter()
                        outs[mode] = eng.compute_log_probs(seqs, return_tensors=True)
                        sync()
                        secs[mode].append(time.perf_counter() - t0)
            same = torch.equal(outs["auto"]["log_probs"], outs["cp_async"]["log_probs"])
            auto, gathers = statistics.median(secs["auto"]), statistics.median(secs["cp_async"])
            print(f"kv_tokens {kv}: chosen loads {n_tokens / auto:9.0f} tok/s, gathers only "
                  f"{n_tokens / gathers:9.0f} tok/s: {gathers / auto:.3f}x; identical "
                  f"log-probs: {same}", flush=True)
    finally:
        os.environ.pop(ENV, None)
        if saved is not None:
            os.environ[ENV] = saved


if __name__ == "__main__":
    main()
