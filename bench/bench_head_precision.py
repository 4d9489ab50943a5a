"""What the fp32 logits of the LM head cost: the engine scoring the GRPO workload with the
head's GEMM writing fp32 logits and with it rounding them to bf16, both in this process,
alternating, median of --reps. Prints tokens/s, the ratio and how far apart the two
scorings are. The plain scores' fused head (which writes no logits) is turned off here:
this measures the written-logits path the sampler outputs and deterministic mode take.

    python bench/bench_head_precision.py --models qwen2.5-1.5b qwen2.5-7b
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scoring  # noqa: E402
from bench_scoring import MODELS, agreement, build_checkpoint, make_workload, timed  # noqa: E402

import tokenspeed.layers.logprob_head as logprob_head  # noqa: E402
from tokenspeed import Engine  # noqa: E402


def fresh_tokens(seqs: list[dict], vocab: int, seed: int) -> list[dict]:
    """The same lengths and prompt sharing with other random tokens: no prefix-cache hits
    on an earlier run's sequences."""
    g = torch.Generator().manual_seed(seed)
    prompts: dict[int, list[int]] = {}
    out = []
    for s in seqs:
        key = id(s["prompt_token_ids"])
        if key not in prompts:
            prompts[key] = torch.randint(0, vocab, (len(s["prompt_token_ids"]),),
                                         generator=g).tolist()
        out.append({"prompt_token_ids": prompts[key], "completion_token_ids": torch.randint(
            0, vocab, (len(s["completion_token_ids"]),), generator=g).tolist()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["qwen2.5-1.5b"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-tokens", type=int, default=65536)
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    bench_scoring.DEVICE = args.device
    root = args.root or Path(tempfile.mkdtemp(prefix="tokenspeed_bench_"))
    fp32_head = logprob_head._MM_OUT_DTYPE
    logprob_head.LogprobHead._fused = lambda self, hidden: False  # written logits throughout
    print(f"# {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}  "
          f"torch {torch.__version__}  fp32 logits available: {fp32_head}")
    for model in args.models:
        path = root / model
        if not path.exists():
            build_checkpoint(model, root)
        vocab = MODELS[model]["hf_config"]["vocab_size"]
        seqs = make_workload("grpo", vocab)
        n_tokens = sum(len(s["prompt_token_ids"]) + len(s["completion_token_ids"]) for s in seqs)
        secs = {True: [], False: []}
        scores = {}
        with Engine(str(path), device=args.device, dtype="bfloat16",
                    kv_cache_tokens=args.kv_tokens) as eng:
            eng.compute_log_probs(fresh_tokens(seqs[:8], vocab, seed=1))
            for rep in range(args.reps):
                for fp32 in (True, False):
                    logprob_head._MM_OUT_DTYPE = fp32 and fp32_head
                    run = fresh_tokens(seqs, vocab, seed=2 + 2 * rep + fp32)
                    secs[fp32].append(timed(lambda: eng.compute_log_probs(run))[1])
            check = fresh_tokens(seqs[::8], vocab, seed=0)  # one completion per prompt
            for fp32 in (True, False):
                logprob_head._MM_OUT_DTYPE = fp32 and fp32_head
                scores[fp32] = [torch.tensor(x)
                                for x in eng.compute_log_probs(check)["log_probs"]]
        logprob_head._MM_OUT_DTYPE = fp32_head
        t32, t16 = statistics.median(secs[True]), statistics.median(secs[False])
        mean_d, max_d = agreement(scores[True], scores[False])
        print(f"{model}: fp32 logits {n_tokens / t32:.0f} tok/s, bf16 logits "
              f"{n_tokens / t16:.0f} tok/s, fp32 / bf16 time {t32 / t16:.3f}; "
              f"|fp32 - bf16| mean {mean_d:.3g} max {max_d:.3g}")


if __name__ == "__main__":
    main()
