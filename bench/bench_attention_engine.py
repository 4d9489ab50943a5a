"""End to end: the engine with the attention kernel as the device chooses it against the
same engine under one other setting, in alternating calls on one engine: by default every
K/V load a cp.async gather (TOKENSPEED_ATTENTION_KV_LOAD=cp_async; the default loads
TMA boxes where pages allow, bench/bench_attention.py), or e.g. the mma.sync kernel
(TOKENSPEED_ATTENTION_KERNEL=mma_sync). The prefix cache is flushed before each call, so
every call computes the same tokens and the pages come from the allocator as in a fresh
run.

    python bench/bench_attention_engine.py [--model qwen2.5-1.5b] [--kv-tokens 65536 262144]
        [--pairs 3] [--against TOKENSPEED_ATTENTION_KV_LOAD=cp_async]
    python bench/bench_attention_engine.py --model tiny --device cpu --kv-tokens 8192 --pairs 1 --grpo-prompts 2
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--root", type=Path, default=Path("/tmp/ckpt"))
    ap.add_argument("--kv-tokens", type=int, nargs="+", default=[65536, 262144])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--grpo-prompts", type=int, default=64)
    ap.add_argument("--against", default="TOKENSPEED_ATTENTION_KV_LOAD=cp_async",
                    help="NAME=value: the setting the default is timed against")
    args = ap.parse_args()
    if "=" not in args.against:
        ap.error(f"--against takes NAME=value, got {args.against!r}")
    env, value = args.against.split("=", 1)
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
    saved = os.environ.pop(env, None)
    try:
        for kv in args.kv_tokens:
            with Engine(str(path), device=args.device, dtype="bfloat16",
                        kv_cache_tokens=kv) as eng:
                eng.compute_log_probs(warm)
                secs = {"default": [], "against": []}
                outs = {}
                for _ in range(args.pairs):
                    for mode in secs:
                        if mode == "against":
                            os.environ[env] = value
                        else:
                            os.environ.pop(env, None)
                        eng.flush_cache()
                        sync()
                        t0 = time.perf_counter()
                        outs[mode] = eng.compute_log_probs(seqs, return_tensors=True)
                        sync()
                        secs[mode].append(time.perf_counter() - t0)
            a, b = outs["default"]["log_probs"], outs["against"]["log_probs"]
            diff = (a.double() - b.double()).abs().max().item()
            mine, other = statistics.median(secs["default"]), statistics.median(secs["against"])
            print(f"kv_tokens {kv}: default {n_tokens / mine:9.0f} tok/s, {args.against} "
                  f"{n_tokens / other:9.0f} tok/s: {other / mine:.3f}x; log-probs identical: "
                  f"{torch.equal(a, b)} (max |diff| {diff:.3g})", flush=True)
    finally:
        os.environ.pop(env, None)
        if saved is not None:
            os.environ[env] = saved

if __name__ == "__main__":
    main()
