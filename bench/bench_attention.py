"""Paged causal prefill attention vs SDPA's flash and cuDNN backends on the same data.

Ours reads K/V through a page table, shuffled or (--layout consecutive) with each
request's pages consecutive in the cache as the engine's next-fit page allocator hands
them out, or (--layout runs) in runs of --run-pages consecutive pages placed anywhere, as
a fragmented pool hands them out (page size 16: cp.async gathers where pages are
scattered, a TMA box per 64 keys where consecutive; 64 or more: TMA a page at a time);
the peers get the same data de-paged and contiguous (K/V heads repeated for GQA), with
causal masks aligned at the bottom right (each request's new tokens are the last of its
sequence). With --view-page P the same consecutive cache is also read as pages of P keys
(a view of the same tensor and table), so page sizes compare on the same bytes in one
process; requests whose pages do not start on a P boundary leave that column n/a.
TFLOP/s count only unmasked work: 4 * D * Hq * sum over new tokens of the keys
they see. The cp_async column is our wgmma kernel with every K/V load a cp.async gather
(TOKENSPEED_ATTENTION_KV_LOAD), the mma_sync column our kernel for devices other than
sm_90 (TOKENSPEED_ATTENTION_KERNEL=mma_sync), both on the same data. The timed calls of
ours, the variants and the peers are taken in turn (medians of --reps each), so a drift
of the clocks over the run falls on all of them alike.

    python bench/bench_attention.py [--models qwen2.5-7b llama-3-8b] [--page 16]
        [--layout shuffled|consecutive|runs] [--run-pages R]
        [--variants TOKENSPEED_ATTENTION_KV_LOAD=cp_async mma_sync ...] [--view-page 64]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import MODELS, interleaved_median_ms  # noqa: E402

import tokenspeed_ext as tse  # noqa: E402


def workloads(seed: int = 0) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (new tokens per request, cached prefix per request)."""
    g = torch.Generator().manual_seed(seed)
    ragged_new = torch.randint(64, 2049, (16,), generator=g).tolist()
    ragged_prefix = torch.randint(0, 4097, (16,), generator=g).tolist()
    return {"8x4096": ([4096] * 8, [0] * 8), "1x16384": ([16384], [0]),
            "ragged16": (ragged_new, ragged_prefix)}


def build(new, prefix, hq, hk, d, page, seed=0, layout="shuffled", run_pages=4):
    """layout: shuffled (every page anywhere), consecutive (each request's pages in order,
    the requests one after another), runs (each request's pages in runs of run_pages,
    the runs anywhere)."""
    gen = torch.Generator("cuda").manual_seed(seed)
    lens = [a + b for a, b in zip(new, prefix)]
    need = [(n + page - 1) // page for n in lens]
    table = torch.zeros(len(new), max(need), dtype=torch.int32, device="cuda")
    if layout == "runs":
        runs = [-(-c // run_pages) for c in need]
        order = torch.randperm(sum(runs), device="cuda", generator=gen).to(torch.int32)
        at = 0
        for i, c in enumerate(need):
            first = order[at:at + runs[i]].repeat_interleave(run_pages)[:c] * run_pages
            table[i, :c] = first + torch.arange(c, device="cuda", dtype=torch.int32) % run_pages
            at += runs[i]
        pages = sum(runs) * run_pages
    else:
        perm = (torch.randperm(sum(need), device="cuda", generator=gen)
                if layout == "shuffled" else torch.arange(sum(need), device="cuda")
                ).to(torch.int32)
        at = 0
        for i, c in enumerate(need):
            table[i, :c] = perm[at:at + c]
            at += c
        pages = sum(need)
    kc = torch.randn(pages, page, hk, d, device="cuda", generator=gen).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(sum(new), hq, d, device="cuda", generator=gen).to(torch.bfloat16)
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32,
                      device="cuda")
    return q, kc, vc, table, cu, torch.tensor(lens, dtype=torch.int32, device="cuda")


def depaged(kc, table, lens):
    page = kc.shape[1]
    return [kc[table[i, :(n + page - 1) // page].long()].flatten(0, 1)[:n]
            for i, n in enumerate(lens.tolist())]


def page_view(kc, vc, table, lens, page: int):
    """The cache and table read as pages of `page` keys (a multiple of the cache's), or None
    where a request's pages do not start on such a boundary or do not run on."""
    r = page // kc.shape[1]
    need = (lens + kc.shape[1] - 1) // kc.shape[1]
    for i, n in enumerate(need.tolist()):
        row = table[i, :n]
        if row[0] % r or not torch.equal(row, row[0] + torch.arange(n, device=row.device,
                                                                     dtype=row.dtype)):
            return None
    if kc.shape[0] % r:
        return None
    k, v = (c.view(-1, page, *c.shape[2:]) for c in (kc, vc))
    return k, v, (table[:, ::r] // r).contiguous()


def with_env(name: str, value: str, fn):
    """fn with the environment variable ``name`` set to ``value`` for each call."""
    def run(i):
        os.environ[name] = value
        try:
            return fn(i)
        finally:
            del os.environ[name]
    return run


def sdpa_peer(q, ks, vs, new, prefix, hq, backend):
    """Per-request SDPA (one batched call when all requests are alike and uncached)."""
    g = hq // ks[0].shape[1]
    cu = [0] + torch.tensor(new).cumsum(0).tolist()
    if all(p == 0 for p in prefix) and len(set(new)) == 1:
        qb = q.view(len(new), new[0], hq, -1).transpose(1, 2)
        kb = torch.stack(ks).repeat_interleave(g, dim=2).transpose(1, 2)
        vb = torch.stack(vs).repeat_interleave(g, dim=2).transpose(1, 2)

        def run(i):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        return run
    from torch.nn.attention.bias import causal_lower_right
    parts = []
    for i in range(len(new)):
        qi = q[cu[i]:cu[i + 1]].transpose(0, 1)[None]
        ki = ks[i].repeat_interleave(g, dim=1).transpose(0, 1)[None]
        vi = vs[i].repeat_interleave(g, dim=1).transpose(0, 1)[None]
        parts.append((qi, ki, vi, causal_lower_right(qi.shape[2], ki.shape[2])))

    def run(i):
        with sdpa_kernel(backend):
            return [F.scaled_dot_product_attention(a, b, c, attn_mask=m) for a, b, c, m in parts]
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["qwen2.5-7b", "llama-3-8b"])
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--layout", choices=["shuffled", "consecutive", "runs"],
                    default="shuffled",
                    help="the pages of a request: shuffled over the cache, consecutive, or "
                         "in runs of --run-pages consecutive pages, the runs shuffled")
    ap.add_argument("--run-pages", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", nargs="*",
                    default=["TOKENSPEED_ATTENTION_KV_LOAD=cp_async", "mma_sync"],
                    help="other settings of ours to time (TFLOP/s columns): NAME=value, or a "
                         "bare TOKENSPEED_ATTENTION_KERNEL value")
    ap.add_argument("--view-page", type=int, default=0,
                    help="also read the consecutive cache as pages of this many keys (a "
                         "multiple of --page), timed in the same rounds")
    args = ap.parse_args()
    if args.view_page and (args.layout != "consecutive" or args.view_page % args.page):
        ap.error("--view-page needs --layout consecutive and a multiple of --page")
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  page {args.page}"
          f" ({args.layout})")
    variants = [v.split("=", 1)[1] if "=" in v else v for v in args.variants]
    settings = [v.split("=", 1) if "=" in v else ("TOKENSPEED_ATTENTION_KERNEL", v)
                for v in args.variants]
    if args.view_page:
        variants.append(f"as page {args.view_page}")
    header = (f"{'model':>12} {'shape':>9} | {'ours ms':>8} {'TF/s':>6} | "
              + "".join(f"{v[:12]:>12} | " for v in variants) +
              f"{'flash':>6} {'x':>5} | {'cudnn':>6} {'x':>5} | max|ours-flash|")
    rows = [header]
    print(header, flush=True)
    for name in args.models:
        spec = MODELS[name]
        hq, hk, d = spec["heads"], spec["kv_heads"], spec["head_dim"]
        for shape, (new, prefix) in workloads().items():
            q, kc, vc, table, cu, lens = build(new, prefix, hq, hk, d, args.page,
                                               layout=args.layout, run_pages=args.run_pages)
            flops = 4 * d * hq * sum(sum(p + i + 1 for i in range(n)) for n, p in zip(new, prefix))
            def call(i, args=(q, kc, vc, table, cu, lens)):
                return tse.paged_prefill_attention(*args)
            out = call(0)
            # other settings of ours, for comparison: the mma.sync kernel that devices
            # other than sm_90 run, the wgmma kernel with cp.async K/V loads only
            fns = {"ours": call}
            for env, value in settings:
                fns[f"{env}={value}"] = with_env(env, value, call)
            viewed = page_view(kc, vc, table, lens, args.view_page) if args.view_page else None
            if viewed is not None:
                def call_view(i, args=(q, *viewed[:2], viewed[2], cu, lens)):
                    return tse.paged_prefill_attention(*args)
                assert torch.equal(call_view(0), out), "the page view reads other keys"
                fns["view"] = call_view
            ks, vs = depaged(kc, table, lens), depaged(vc, table, lens)
            diff = float("nan")
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                try:
                    run = sdpa_peer(q, ks, vs, new, prefix, hq, backend)
                    ref = run(0)
                except RuntimeError as err:
                    print(f"  {backend.name} unavailable for {shape}: {str(err)[:120]}")
                    continue
                fns[backend.name] = run
                if backend == SDPBackend.FLASH_ATTENTION:
                    ref = (ref.transpose(1, 2).reshape(out.shape) if torch.is_tensor(ref)
                           else torch.cat([r[0].transpose(0, 1) for r in ref]))
                    diff = (out.float() - ref.float()).abs().max().item()
            ms = interleaved_median_ms(fns, args.reps)
            ours_ms = ms["ours"]
            variant_tfs = "".join(f"{flops / ms[f'{env}={value}'] / 1e9:12.0f} | "
                                  for env, value in settings)
            if args.view_page:
                variant_tfs += (f"{flops / ms['view'] / 1e9:12.0f} | " if "view" in ms
                                else f"{'n/a':>12} | ")
            cells = [f"{flops / ms[b.name] / 1e9:6.0f} {ms[b.name] / ours_ms:5.2f}"
                     if b.name in ms else f"{'n/a':>6} {'':>5}"
                     for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION)]
            line = (f"{name:>12} {shape:>9} | {ours_ms:8.3f} {flops / ours_ms / 1e9:6.0f} | "
                    f"{variant_tfs}{cells[0]} | {cells[1]} | {diff:.3g}")
            rows.append(line)
            print(line, flush=True)
            del q, kc, vc, ks, vs, out, fns, call, viewed
            run = ref = None  # the peers' copies of the data
            torch.cuda.empty_cache()
    print("\n".join(["", "summary (peer columns: their TFLOP/s, their time / ours)"] + rows))


if __name__ == "__main__":
    main()
