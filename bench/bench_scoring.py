"""End-to-end scoring: tokenspeed Engine vs HF transformers, both in this process.

Workloads (seeded): GRPO-shaped, 64 prompts x 8 completions, prompt lengths uniform in
[128, 2048], completion lengths log-normal with median 512 capped at 4096; uniform,
16 x (512 prompt + 512 completion). Checkpoints: random bf16 weights with the real
configs of Qwen2.5-1.5B / Qwen2.5-7B, or the MoE Qwen3-30B-A3B with 12 of its 48 layers
(qwen3-30b-a3b-12l; MFU then counts active parameters), built with transformers and
saved once per run.

The HF peer is what RL trainers do: sequences sorted by length, packed into right-padded
micro-batches under a token budget (best of a small sweep), sdpa attention, bf16 forward,
then an fp32 log_softmax gather over the completion tokens.

    python bench/bench_scoring.py --models qwen2.5-1.5b qwen2.5-7b --workloads grpo uniform
    python bench/bench_scoring.py --models qwen3-30b-a3b-12l --workloads grpo
    python bench/bench_scoring.py --models qwen3-30b-a3b-12l --tp-sizes 1 2   # 2+ GPUs

``--tp-sizes`` also scores with tensor-parallel engines (worker processes, one GPU each):
tokens/s, tokens/s per GPU over tp_size 1's, the device memory each GPU holds after the
call (reserved by the workers' allocators, so their peak), and the largest difference
from tp_size 1's log-probs. ``--page-sizes 64`` likewise scores with engines of other KV
page sizes (speed over the default's, tokens computed after prefix-cache hits).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import statistics
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import MODELS  # noqa: E402

# a tiny config to smoke-test this script anywhere: --models tiny --device cpu
MODELS = {**MODELS, "tiny": dict(params=1e6, hf_config=dict(
    model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
    max_position_embeddings=8192, tie_word_embeddings=True)),
    "tiny-moe": dict(params=1e6, hf_config=dict(
        model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
        num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, vocab_size=1000,
        max_position_embeddings=8192))}
DEVICE = "cuda"

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16, for MFU


def make_workload(name: str, vocab: int, seed: int = 0, grpo_prompts: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    if name == "grpo":
        for _ in range(grpo_prompts):
            plen = int(torch.randint(128, 2049, (1,), generator=g))
            prompt = torch.randint(0, vocab, (plen,), generator=g).tolist()
            for _ in range(8):
                clen = math.exp(math.log(512) + 0.6 * float(torch.randn(1, generator=g)))
                clen = max(1, min(4096, int(clen)))
                comp = torch.randint(0, vocab, (clen,), generator=g).tolist()
                seqs.append({"prompt_token_ids": prompt, "completion_token_ids": comp})
    elif name == "uniform":
        for _ in range(16):
            seqs.append({"prompt_token_ids": torch.randint(0, vocab, (512,), generator=g).tolist(),
                         "completion_token_ids": torch.randint(0, vocab, (512,), generator=g).tolist()})
    else:
        raise ValueError(f"unknown workload {name!r}")
    return seqs


def build_checkpoint(model: str, root: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**MODELS[model]["hf_config"])
    torch.manual_seed(0)
    with torch.device(DEVICE):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    # random init has std 0.02 everywhere; that is what both systems see
    path = root / model
    m.save_pretrained(path)
    del m
    _empty_cache()
    return path


def hf_score(model, seqs: list[dict], budget: int) -> list[torch.Tensor]:
    """Sorted, right-padded micro-batches under `budget` padded tokens."""
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i]["prompt_token_ids"]) +
                                                     len(seqs[i]["completion_token_ids"])))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    i = 0
    while i < len(order):
        longest = len(seqs[order[i]]["prompt_token_ids"]) + len(seqs[order[i]]["completion_token_ids"])
        n = max(1, budget // longest)
        group = order[i:i + n]
        i += n
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        mask = torch.zeros(len(group), longest, dtype=torch.long)
        for r, j in enumerate(group):
            toks = seqs[j]["prompt_token_ids"] + seqs[j]["completion_token_ids"]
            ids[r, :len(toks)] = torch.tensor(toks)
            mask[r, :len(toks)] = 1
        ids, mask = ids.to(DEVICE, non_blocking=True), mask.to(DEVICE, non_blocking=True)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            del logits
            tgt = logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            del logp
        for r, j in enumerate(group):
            p, c = len(seqs[j]["prompt_token_ids"]), len(seqs[j]["completion_token_ids"])
            out[j] = tgt[r, p - 1:p - 1 + c].cpu()
    return out  # type: ignore[return-value]


def _cuda() -> bool:
    return DEVICE.startswith("cuda")


def _empty_cache() -> None:
    if _cuda():
        torch.cuda.empty_cache()


def _reset_peak() -> None:
    if _cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _used_gib(devices: int) -> list[float]:
    """Device memory in use on each of the first ``devices`` GPUs (every process's)."""
    if not _cuda():
        return [float("nan")] * devices
    return [(total - free) / 2**30
            for free, total in (torch.cuda.mem_get_info(d) for d in range(devices))]


def page_size_runs(path: Path, sizes: list[int], kv_tokens: int, warm: list[dict],
                   seqs: list[dict], n_tokens: int, ts_secs: float,
                   ts_res: list[torch.Tensor]) -> dict:
    """The same call on engines of each page size in ``sizes`` other than the default:
    tokens/s, speed over the default page size's, the tokens the model computed (the
    prefix cache shares whole pages only, so larger pages share less of a prompt) and the
    largest difference from the default's log-probs."""
    import inspect

    from tokenspeed import Engine
    default = inspect.signature(Engine).parameters["page_size"].default
    row: dict = {}
    for size in sizes:
        if size == default:
            continue
        _empty_cache()
        with Engine(str(path), device=DEVICE, dtype="bfloat16", kv_cache_tokens=kv_tokens,
                    page_size=size) as eng:
            eng.compute_log_probs(warm)
            hits = eng.stats()["prefix_hit_tokens"]
            out, secs, _ = timed(lambda: eng.compute_log_probs(seqs))
            computed = n_tokens - (eng.stats()["prefix_hit_tokens"] - hits)
        res = [torch.tensor(x) for x in out["log_probs"]]
        row.update({f"page{size}_tok_s": n_tokens / secs,
                    f"page{size}_vs_page{default}": ts_secs / secs,
                    f"page{size}_computed_tokens": computed,
                    f"page{size}_max_abs_diff_vs_page{default}": agreement(res, ts_res)[1]})
        print(f"  page_size {size}: {n_tokens / secs:10.0f} tok/s, {ts_secs / secs:.3f}x "
              f"page_size {default}'s speed, {computed} tokens computed")
    return row


def tensor_parallel(path: Path, sizes: list[int], kv_tokens: int, warm: list[dict],
                    seqs: list[dict], n_tokens: int, ts_secs: float,
                    ts_res: list[torch.Tensor]) -> dict:
    """The same call on engines of each tp_size > 1 in ``sizes`` (see the docstring)."""
    from tokenspeed import Engine
    row: dict = {}
    for size in sizes:
        if size == 1:
            continue
        if _cuda() and torch.cuda.device_count() < size:
            print(f"  tp_size {size}: needs {size} CUDA devices, this machine has "
                  f"{torch.cuda.device_count()}; not run")
            continue
        _empty_cache()
        before = _used_gib(size)
        with Engine(str(path), device=DEVICE, dtype="bfloat16", kv_cache_tokens=kv_tokens,
                    tp_size=size) as eng:
            eng.compute_log_probs(warm)
            out, secs, _ = timed(lambda: eng.compute_log_probs(seqs))
            held = [a - b for a, b in zip(_used_gib(size), before)]
        res = [torch.tensor(x) for x in out["log_probs"]]
        row.update({f"tp{size}_tok_s": n_tokens / secs,
                    f"tp{size}_per_gpu_vs_tp1": ts_secs / (secs * size),
                    f"tp{size}_gpu_gib": max(held),
                    f"tp{size}_max_abs_diff_vs_tp1": agreement(res, ts_res)[1]})
        print(f"  tp_size {size}: {n_tokens / secs:10.0f} tok/s, "
              f"{ts_secs / (secs * size):.3f}x tp_size 1's per GPU, "
              f"{max(held):.1f} GiB a GPU")
    return row


def timed(fn):
    """(result, seconds, peak GiB allocated since the last reset: weights and pools too)."""
    if _cuda():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if _cuda():
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if _cuda() else float("nan")
    return result, time.perf_counter() - t0, peak


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    d = torch.cat([(x.float() - y.float()).abs() for x, y in zip(a, b)])
    return d.mean().item(), d.max().item()


def run(model_name: str, workload: str, root: Path, budgets: list[int], ref_subset: int,
        kv_tokens: int, grpo_prompts: int, top_logprobs: int = 0,
        deterministic: bool = True, rich_repeats: int = 5,
        tp_sizes: tuple[int, ...] = (1,), page_sizes: tuple[int, ...] = ()) -> dict:
    from transformers import AutoModelForCausalLM

    from tokenspeed import Engine

    spec = MODELS[model_name]
    path = root / model_name
    if not path.exists():
        build_checkpoint(model_name, root)
    seqs = make_workload(workload, spec["hf_config"]["vocab_size"], grpo_prompts=grpo_prompts)
    n_tokens = sum(len(s["prompt_token_ids"]) + len(s["completion_token_ids"]) for s in seqs)
    n_params = spec["params"]

    warm = make_workload(workload, spec["hf_config"]["vocab_size"], seed=1)[:4]
    _reset_peak()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                              attn_implementation="sdpa").to(DEVICE).eval()
    hf_score(hf, warm, budgets[0])
    best = None
    for budget in budgets:
        _reset_peak()
        try:
            res, secs, mem = timed(lambda: hf_score(hf, seqs, budget))
        except torch.OutOfMemoryError:
            _empty_cache()
            continue
        print(f"  hf budget {budget:6d}: {n_tokens / secs:10.0f} tok/s  peak +{mem:.1f} GiB")
        if best is None or secs < best[1]:
            best = (res, secs, mem, budget)
    assert best is not None, "HF ran out of memory at every budget"
    hf_res, hf_secs, hf_mem, hf_budget = best
    del hf
    _reset_peak()
    before = _used_gib(1)[0]
    with Engine(str(path), device=DEVICE, dtype="bfloat16", kv_cache_tokens=kv_tokens) as eng:
        eng.compute_log_probs(warm)  # other random tokens: no prefix-cache hits later
        hits_before = eng.stats()["prefix_hit_tokens"]
        out, ts_secs, ts_mem = timed(lambda: eng.compute_log_probs(seqs))
        ts_held = _used_gib(1)[0] - before
        # tokens whose K/V came from the prefix cache were never run through the model
        computed = n_tokens - (eng.stats()["prefix_hit_tokens"] - hits_before)
        rich_ratio = float("nan")
        if top_logprobs:
            # every repeat finds the prompts the first call cached: the same work but the
            # head; tensor outputs, as [n, K] ids and log-probs per sequence are meant to be
            # taken (as nested lists they would time the building of 2 K Python numbers a
            # token). One rich call warms its path, then the two alternate; median ratio.
            def plain():
                return eng.compute_log_probs(seqs, return_tensors=True)

            def rich():
                return eng.compute_log_probs(seqs, top_logprobs=top_logprobs,
                                             return_tensors=True)
            rich()
            ratios = []
            for _ in range(rich_repeats):
                plain_secs, rich_secs = timed(plain)[1], timed(rich)[1]
                ratios.append(rich_secs / plain_secs)
            rich_ratio = statistics.median(ratios)
            print(f"  top_logprobs={top_logprobs} over plain, {rich_repeats} alternating "
                  f"pairs: " + " ".join(f"{r:.3f}" for r in ratios))
        capture = capture_overhead(eng, warm, seqs) if eng.model_config.moe else {}
    ts_res = [torch.tensor(x) for x in out["log_probs"]]
    _empty_cache()
    tp_row = tensor_parallel(path, list(tp_sizes), kv_tokens, warm, seqs, n_tokens, ts_secs,
                             ts_res)
    tp_row.update(page_size_runs(path, list(page_sizes), kv_tokens, warm, seqs, n_tokens,
                                 ts_secs, ts_res))
    # deterministic mode on the same workload, with its own warm-up
    det_secs, det_res = math.nan, None
    if deterministic:
        with Engine(str(path), device=DEVICE, dtype="bfloat16", kv_cache_tokens=kv_tokens,
                    deterministic=True) as eng:
            eng.compute_log_probs(warm)
            det_out, det_secs, _ = timed(lambda: eng.compute_log_probs(seqs))
        det_res = [torch.tensor(x) for x in det_out["log_probs"]]
        _empty_cache()

    mean_d, max_d = agreement(ts_res, hf_res)
    row = {
        "model": model_name, "workload": workload, "tokens": n_tokens,
        "hf_tok_s": n_tokens / hf_secs, "hf_peak_gib": hf_mem, "hf_budget": hf_budget,
        "ts_tok_s": n_tokens / ts_secs, "ts_peak_gib": ts_mem, "ts_gpu_gib": ts_held,
        "ts_kv_tokens": kv_tokens, **tp_row,
        "speedup": hf_secs / ts_secs,
        "det_tok_s": n_tokens / det_secs, "det_vs_default": ts_secs / det_secs,
        # 2 x params x tokens scored per second over the peak; tokenspeed's can pass 1 when
        # the prefix cache saves work, so its rate on the tokens it computed is given too
        "hf_mfu": 2 * n_params * n_tokens / hf_secs / PEAK_BF16_FLOPS,
        "ts_mfu": 2 * n_params * n_tokens / ts_secs / PEAK_BF16_FLOPS,
        "ts_computed_tokens": computed,
        "ts_mfu_computed": 2 * n_params * computed / ts_secs / PEAK_BF16_FLOPS,
        "mean_abs_diff": mean_d, "max_abs_diff": max_d, **capture,
        # time with top_logprobs=K over time without (target <= 1.10 on GRPO at K = 20)
        "top_logprobs_time_ratio": rich_ratio,
    }
    if ref_subset:
        # spread over the workload: GRPO's neighbours share a prompt
        pick = list(range(0, len(seqs), max(1, len(seqs) // ref_subset)))[:ref_subset]
        row.update(reference_errors(path, [seqs[i] for i in pick], [ts_res[i] for i in pick],
                                    [hf_res[i] for i in pick],
                                    det_res and [det_res[i] for i in pick]))
    return row


def capture_overhead(eng, warm: list[dict], seqs: list[dict]) -> dict:
    """Scoring time with routing capture on over off, both from an empty prefix cache and
    with tensor outputs (a nested list of every token's experts would time Python)."""
    eng.compute_log_probs(warm, return_routed_experts=True)  # allocates the routing buffer
    secs = {False: math.inf, True: math.inf}
    for capture in (False, True, False, True):  # best of two each, interleaved
        eng.shard.scheduler.flush()
        _, t, _ = timed(lambda: eng.compute_log_probs(
            seqs, return_tensors=True, return_routed_experts=capture))
        secs[capture] = min(secs[capture], t)
    return {"capture_overhead": secs[True] / secs[False] - 1}


def reference_errors(path: Path, seqs, ts_res, hf_res, det_res) -> dict:
    """Both bf16 systems (and tokenspeed's deterministic mode) against the same
    checkpoint scored by HF in fp32."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                               attn_implementation="sdpa").to(DEVICE).eval()
    ref_res = hf_score(ref, seqs, 8192)
    del ref
    _empty_cache()
    ts_mean, ts_max = agreement(ts_res, ref_res)
    hf_mean, hf_max = agreement(hf_res, ref_res)
    diff, se = paired_difference(ts_res, hf_res, ref_res)
    return {"ts_vs_fp32_mean": ts_mean, "ts_vs_fp32_max": ts_max,
            "det_vs_fp32_mean": agreement(det_res, ref_res)[0] if det_res else math.nan,
            "hf_vs_fp32_mean": hf_mean, "hf_vs_fp32_max": hf_max,
            "ts_minus_hf_err": diff, "ts_minus_hf_err_se": se}


def paired_difference(a, b, ref) -> tuple[float, float]:
    """Mean over tokens of |a - ref| - |b - ref|, and its standard error with sequences as
    the independent units (a sequence's tokens share their errors' causes)."""
    sums = torch.tensor([((x.double() - r.double()).abs() - (y.double() - r.double()).abs()).sum()
                         for x, y, r in zip(a, b, ref)])
    counts = torch.tensor([float(len(r)) for r in ref], dtype=torch.float64)
    n, k = counts.sum(), len(ref)
    diff = sums.sum() / n
    se = ((sums - counts * diff).pow(2).sum() * k / max(k - 1, 1)).sqrt() / n
    return diff.item(), se.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-1.5b", "qwen2.5-7b"])
    ap.add_argument("--workloads", nargs="+", default=["grpo", "uniform"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--kv-tokens", type=int, default=65536,
                    help="engine KV pool: running requests are reserved whole, and the "
                         "8 completions of a GRPO prompt run close together, so a pool of "
                         "a few batches' worth keeps every prefix hit")
    ap.add_argument("--ref-subset", type=int, default=8, help="sequences checked against fp32")
    ap.add_argument("--root", type=Path, default=None, help="where checkpoints are saved")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--grpo-prompts", type=int, default=64)
    ap.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                    help="also time the call with top_logprobs=K against the plain call")
    ap.add_argument("--rich-repeats", type=int, default=5,
                    help="alternating plain / top_logprobs pairs timed (median ratio)")
    ap.add_argument("--no-deterministic", action="store_true",
                    help="skip the run of deterministic mode")
    ap.add_argument("--tp-sizes", type=int, nargs="+", default=[1],
                    help="also score with engines of these tp_size (> 1: one GPU a rank)")
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[],
                    help="also score with engines of these KV page sizes (64 and up: the "
                         "attention kernel loads pages by TMA)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    root = args.root or Path(tempfile.mkdtemp(prefix="tokenspeed-bench-"))
    name = torch.cuda.get_device_name() if _cuda() else "cpu"
    print(f"# {name}  torch {torch.__version__}")
    rows = []
    for model in args.models:
        for workload in args.workloads:
            print(f"{model} / {workload}")
            row = run(model, workload, root, args.budgets, args.ref_subset, args.kv_tokens,
                      args.grpo_prompts, args.top_logprobs, not args.no_deterministic,
                      args.rich_repeats, tuple(args.tp_sizes), tuple(args.page_sizes))
            rows.append(row)
            print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()))
    print("\n| model | workload | HF tok/s | tokenspeed tok/s | speedup | deterministic tok/s "
          "(x default) | HF peak GiB | tokenspeed peak GiB | MFU HF / ts (ts on computed "
          "tokens) | mean/max abs diff | vs fp32 ts / HF / det (mean); ts - HF +- se |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = (f"{r.get('ts_vs_fp32_mean', float('nan')):.4g} / "
               f"{r.get('hf_vs_fp32_mean', float('nan')):.4g} / "
               f"{r.get('det_vs_fp32_mean', float('nan')):.4g}; "
               f"{r.get('ts_minus_hf_err', float('nan')):+.2g} +- "
               f"{r.get('ts_minus_hf_err_se', float('nan')):.1g}")
        print(f"| {r['model']} | {r['workload']} | {r['hf_tok_s']:.0f} | {r['ts_tok_s']:.0f} | "
              f"{r['speedup']:.2f}x | {r['det_tok_s']:.0f} ({r['det_vs_default']:.3f}x) | "
              f"{r['hf_peak_gib']:.1f} | {r['ts_peak_gib']:.1f} | "
              f"{r['hf_mfu']:.2f} / {r['ts_mfu']:.2f} ({r['ts_mfu_computed']:.2f}) | "
              f"{r['mean_abs_diff']:.3g} / "
              f"{r['max_abs_diff']:.3g} | {ref} |")


if __name__ == "__main__":
    main()
