"""One MoE layer (router + experts, bf16) at Qwen3-30B-A3B widths: tokenspeed's SparseMoE
(moe_route, moe_dispatch, torch._grouped_mm expert GEMMs, moe_combine) vs a plain
torch._grouped_mm implementation (sort, bincount, grouped GEMMs, weighted index_add) vs HF
transformers' Qwen3MoeSparseMoeBlock with its default (grouped_mm) experts implementation, in one
process. Also tokenspeed's phases alone, the expert GEMMs of deterministic mode
(grouped_gemm) next to the default ones (det, x gemms = its time / theirs), and its error
against an fp32 reference next to HF-bf16's. Random inputs (never zeros), rotated over several sets.

    python bench/bench_moe.py [--tokens 1024 4096 16384]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import MODELS, median_ms  # noqa: E402

import tokenspeed_ext as tse  # noqa: E402
from tokenspeed.layers.activation import silu_and_mul  # noqa: E402
from tokenspeed.layers.moe import SparseMoE, grouped_linear  # noqa: E402

SPEC = MODELS["qwen3-30b-a3b"]


def torch_grouped_mm_moe(x, router, gate_up, down, top_k):
    """The grouped-GEMM MoE layer written with torch ops only (HF's grouped_mm path)."""
    probs = torch.softmax(F.linear(x, router), -1, dtype=torch.float32)
    w, ids = torch.topk(probs, top_k, -1)
    w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
    flat = ids.view(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=router.shape[0])
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // top_k]
    h = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, -1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)
    y = y * w.view(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, order // top_k, y)


def hf_block(layer: SparseMoE, device: str = "cuda"):
    """HF's sparse block (default experts implementation) with the same weights."""
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    cfg = AutoConfig.for_model(**SPEC["hf_config"])
    # what from_pretrained picks on a GPU of sm_80+ (a bare block would run its eager loop)
    cfg._experts_implementation = "grouped_mm"
    block = Qwen3MoeSparseMoeBlock(cfg).to(device, layer.gate.weight.dtype).eval()
    with torch.no_grad():
        block.gate.weight.copy_(layer.gate.weight)
        block.experts.gate_up_proj.copy_(layer.experts.gate_up_proj)
        block.experts.down_proj.copy_(layer.experts.down_proj)
    return block


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    h, e, k, inter = SPEC["hidden"], SPEC["experts"], SPEC["top_k"], SPEC["moe_intermediate"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = SparseMoE(h, e, k, inter, True, 0).to(torch.bfloat16).eval()
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.02)
        layer.experts.gate_up_proj.normal_(0, 0.02)
        layer.experts.down_proj.normal_(0, 0.02)
    hf = hf_block(layer)
    w_r, w_gu, w_d = layer.gate.weight, layer.experts.gate_up_proj, layer.experts.down_proj
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  hidden {h}, {e} "
          f"experts, top-{k}, moe_intermediate {inter}")
    header = (f"{'T':>6} | {'ours ms':>8} {'TFLOP/s':>7} | {'grouped_mm':>10} {'x ours':>6} | "
              f"{'HF':>8} {'x ours':>6} | {'route':>6} {'dispatch':>8} {'gemms':>6} "
              f"{'combine':>7} | {'det':>6} {'x gemms':>7} | {'err ours':>8} {'err HF':>8}")
    rows = [header]
    print(header, flush=True)
    for t in args.tokens:
        sets = 4
        xs = [torch.randn(t, h, device="cuda").to(torch.bfloat16) for _ in range(sets)]
        flops = 2 * t * k * 3 * h * inter
        with torch.inference_mode():
            ours = median_ms(lambda i: layer(xs[i % sets], None), args.reps)
            peer = median_ms(lambda i: torch_grouped_mm_moe(xs[i % sets], w_r, w_gu, w_d, k),
                             args.reps)
            theirs = median_ms(lambda i: hf(xs[i % sets][None]), args.reps)
            x = xs[0]
            logits = F.linear(x, w_r)
            route = median_ms(lambda i: tse.moe_route(logits, k, True, validate=False), args.reps)
            wts, ids = tse.moe_route(logits, k, True, validate=False)
            disp = median_ms(lambda i: tse.moe_dispatch(ids, e, validate=False), args.reps)
            offs, tok, rows_ = tse.moe_dispatch(ids, e, validate=False)
            xsrt = x.index_select(0, tok)
            gemms = median_ms(lambda i: grouped_linear(
                silu_and_mul(grouped_linear(xsrt, w_gu, offs)), w_d, offs), args.reps)
            det = median_ms(lambda i: grouped_linear(
                silu_and_mul(grouped_linear(xsrt, w_gu, offs, True)), w_d, offs, True),
                args.reps)
            y = grouped_linear(silu_and_mul(grouped_linear(xsrt, w_gu, offs)), w_d, offs)
            comb = median_ms(lambda i: tse.moe_combine(y, rows_, wts), args.reps)
            # error against the same layer in fp32 (bf16 weights, fp32 math)
            ref = torch_grouped_mm_moe_fp32(x, w_r, w_gu, w_d, k)
            err_ours = (layer(x, None).float() - ref).abs().mean().item()
            err_hf = (hf(x[None])[0].float() - ref).abs().mean().item()
        line = (f"{t:>6} | {ours:8.3f} {flops / ours / 1e9:7.0f} | {peer:10.3f} "
                f"{peer / ours:6.2f} | {theirs:8.3f} {theirs / ours:6.2f} | {route:6.3f} "
                f"{disp:8.3f} {gemms:6.3f} {comb:7.3f} | {det:6.3f} {det / gemms:7.2f} | "
                f"{err_ours:8.2e} {err_hf:8.2e}")
        rows.append(line)
        print(line, flush=True)
        del xs
        torch.cuda.empty_cache()
    print("\n".join(["", "summary (ms; x ours = peer time / ours)"] + rows))


def torch_grouped_mm_moe_fp32(x, router, gate_up, down, top_k):
    """fp32 reference of the layer, expert by expert."""
    xf = x.float()
    probs = torch.softmax(xf @ router.float().t(), -1)
    w, ids = torch.topk(probs, top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(xf)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = (xf[tok] @ gate_up[e].float().t()).chunk(2, -1)
        out.index_add_(0, tok, (F.silu(gate) * up @ down[e].float().t()) * w[tok, slot, None])
    return out


if __name__ == "__main__":
    main()
