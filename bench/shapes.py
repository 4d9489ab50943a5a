"""Real model configs shared by the benchmarks, and the one timing helper they use.

MODELS[name]["hf_config"] holds the keyword arguments of
``transformers.AutoConfig.for_model``; the flat fields beside it are what the kernel
benchmarks read.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def _model(model_type: str, hidden: int, layers: int, heads: int, kv_heads: int,
           intermediate: int, vocab: int, params: float, **extra) -> dict:
    hf = dict(model_type=model_type, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads,
              intermediate_size=intermediate, vocab_size=vocab, **extra)
    return dict(hf_config=hf, params=params, hidden=hidden, layers=layers, heads=heads,
                kv_heads=kv_heads, head_dim=hidden // heads, intermediate=intermediate,
                vocab=vocab)


MODELS: dict[str, dict] = {
    # head dim 64
    "qwen2.5-0.5b": _model("qwen2", 896, 24, 14, 2, 4864, 151936, 0.49e9,
                           rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                           max_position_embeddings=32768),
    "llama-3.2-1b": _model("llama", 2048, 16, 32, 8, 8192, 128256, 1.24e9,
                           rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=True,
                           max_position_embeddings=8192),
    "qwen2.5-1.5b": _model("qwen2", 1536, 28, 12, 2, 8960, 151936, 1.54e9,
                           rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                           max_position_embeddings=32768),
    "qwen2.5-7b": _model("qwen2", 3584, 28, 28, 4, 18944, 152064, 7.62e9,
                         rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         max_position_embeddings=32768),
    "llama-3-8b": _model("llama", 4096, 32, 32, 8, 14336, 128256, 8.03e9,
                         rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         max_position_embeddings=8192),
}


def _qwen3_moe_30b(layers: int) -> dict:
    """Qwen3-30B-A3B's widths with ``layers`` of its 48 layers; ``params`` counts the
    parameters one token's matmuls use (attention, router, its 8 experts, the LM head),
    the base of MFU on active parameters."""
    hidden, experts, top_k, inter, vocab = 2048, 128, 8, 768, 151936
    attn = hidden * (32 * 128 + 2 * 4 * 128) + 32 * 128 * hidden
    active = layers * (attn + hidden * experts + top_k * 3 * hidden * inter) + hidden * vocab
    spec = _model("qwen3_moe", hidden, layers, 32, 4, 6144, vocab, active, head_dim=128,
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  max_position_embeddings=40960, num_experts=experts,
                  num_experts_per_tok=top_k, moe_intermediate_size=inter,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    spec.update(head_dim=128, experts=experts, top_k=top_k, moe_intermediate=inter)
    return spec


# the full model's 61 GB of bf16 weights exceed the GPU machine's free disk: benchmark
# 12 of its 48 layers (the ratio to HF is what counts)
MODELS["qwen3-30b-a3b"] = _qwen3_moe_30b(48)
MODELS["qwen3-30b-a3b-12l"] = _qwen3_moe_30b(12)


def median_ms(fn: Callable[[int], object], reps: int = 20, warmup: int = 3) -> float:
    """Median over `reps` CUDA-event timings of fn(i) after `warmup` untimed calls.

    fn receives the repetition index so callers can rotate among input sets.
    """
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def interleaved_median_ms(fns: dict[str, Callable[[int], object]], reps: int = 20,
                          warmup: int = 3) -> dict[str, float]:
    """median_ms of each of ``fns``, their timed calls taken in turn (a round of one call
    each, the order rotating by a step every round), so that a drift of the device's
    clocks over the run (power, heat) falls on every peer alike and their ratios hold."""
    names = list(fns)
    for name in names:
        for i in range(warmup):
            fns[name](i)
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name](i)
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def back_to_back_ms(fn: Callable[[int], object], reps: int = 20, warmup: int = 3) -> float:
    """Time per call of `reps` calls enqueued back to back between two CUDA events (best
    of three): the steady state of a caller that keeps the device busy, as the engine
    does, without the launch latency each call of median_ms pays on an idle device."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(reps):
            fn(i)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def timed_ms(fn: Callable[[int], object], device: str | torch.device, reps: int) -> float:
    """median_ms on CUDA; on the CPU the median wall time of fn(i) after one warm-up."""
    if torch.device(device).type == "cuda":
        return median_ms(fn, reps=reps)
    fn(0)
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s (bytes read plus bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda i, d=dst, s=src: d.copy_(s), reps=10)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)
