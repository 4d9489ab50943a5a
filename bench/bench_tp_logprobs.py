"""Tensor-parallel log-prob head: exchange [T, 4] partials vs all-gather the logits.

Each of tp ranks holds a V/tp vocabulary shard of the LM head (uneven when tp does not
divide V) and runs the engine's own ``LogprobHead`` on the same hidden states [T, H]:
"partials" all-gathers 16 bytes a row, "gather" all-gathers its [T, V/tp] bf16 logits
(in the head's bounded row blocks). Both are timed end to end (head matmul + op +
collective) and as the collective alone, with the bytes each rank receives. bf16 hidden
and weights, random (never zeros); NCCL, one GPU per rank, spawned by this script.

    python bench/bench_tp_logprobs.py [--tp 2] [--t 16384] [--v 152064] [--h 3584]
    python bench/bench_tp_logprobs.py --top-logprobs 20   # the rich head: each rank's
        # partials plus its k candidates (fp32 values, int64 ids) vs the gathered logits

Needs 2+ GPUs; ``--device cpu`` runs the same code on gloo with small shapes, as a check.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shapes import timed_ms  # noqa: E402

from tokenspeed.parallel.group import building_with  # noqa: E402
from tokenspeed.parallel.launch import free_port, init_tp_group  # noqa: E402
from tokenspeed.layers.logprob_head import HeadOptions, LogprobHead  # noqa: E402
from tokenspeed.layers.sampler_filters import RowOptions, candidate_count  # noqa: E402


def run(rank: int, args: argparse.Namespace, port: int) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.tp,
                            device_id=device if device.type == "cuda" else None)
    tp = init_tp_group(args.tp, device)
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)  # same hidden/targets on every rank
    hidden = torch.randn(args.t, args.h, generator=gen, device=device, dtype=dtype)
    targets = torch.randint(0, args.v, (args.t,), generator=gen, device=device)
    heads = {}
    with building_with(tp), torch.device(device):
        for gather in (False, True):
            heads[gather] = LogprobHead(args.v, args.h,
                                        options=HeadOptions(gather_logits=gather)).to(dtype)
    heads[False].weight.data.normal_(0, args.h ** -0.5)
    heads[True].weight = heads[False].weight

    k = args.top_logprobs
    zeros = torch.zeros(args.t, dtype=torch.int64, device=device)
    opts = RowOptions(zeros, zeros.float() + 1, zeros.float(), k, None,
                      candidate_count(k, 0, False), filtered=False)

    def head_fn(gather: bool):
        if k:
            return lambda i: heads[gather].forward_rich(hidden, targets, 1.0, opts)
        return lambda i: heads[gather](hidden, targets, 1.0, True)

    def outputs(gather: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(the scores to compare, the top-k ids or None)."""
        out = head_fn(gather)(0)
        if k:
            return [out.log_probs, out.entropy, out.top_logprobs], out.top_ids
        return list(out), None

    (got_p, ids_p), (got_g, ids_g) = outputs(False), outputs(True)
    err = max((a - b).abs().max().item() for a, b in zip(got_p, got_g))
    same_ids = ids_p is None or torch.equal(ids_p, ids_g)

    width = -(-args.v // args.tp)  # the widest shard (vocab_range gives the remainder out)
    # what one rank sends: its [T, 4] partials, with k its k candidates' values and ids
    partials = [torch.randn(args.t, 4, device=device)]
    if k:
        partials += [torch.randn(args.t, opts.candidates, device=device),
                     torch.zeros(args.t, opts.candidates, dtype=torch.int64, device=device)]
    logits = [torch.randn(args.t, width, device=device, dtype=dtype)]
    rows = []
    for name, gather, payload in (("partials", False, partials), ("gather", True, logits)):
        received = (args.tp - 1) * sum(x.numel() * x.element_size() for x in payload)
        total = timed_ms(head_fn(gather), device, args.reps)
        comm = timed_ms(lambda i, xs=payload: [tp.all_gather(x) for x in xs], device,
                        args.reps)
        rows.append((name, received, total, comm))
    if rank == 0:
        print(f"tp={args.tp} T={args.t} V={args.v} H={args.h} bf16 on {device.type}"
              f"{f', top_logprobs={k} ({opts.candidates} candidates a rank)' if k else ''}; "
              f"max |partials - gather| = {err:.2e}"
              f"{'' if same_ids else '; top ids DIFFER'}")
        print(f"{'exchange':>9} {'MiB received/rank':>18} {'head ms':>9} {'collective ms':>14}")
        for name, received, total, comm in rows:
            print(f"{name:>9} {received / 2**20:18.3f} {total:9.3f} {comm:14.3f}")
        (_, rb_p, t_p, c_p), (_, rb_g, t_g, c_g) = rows
        print(f"gather / partials: bytes {rb_g / rb_p:.0f}x, head time {t_g / t_p:.2f}x, "
              f"collective time {c_g / c_p:.1f}x")
    dist.barrier()  # a rank that tears down while a peer still prints can abort it
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=None, help="ranks (default: all GPUs)")
    parser.add_argument("--t", type=int, default=None, help="rows (cuda 16384, cpu 256)")
    parser.add_argument("--v", type=int, default=None, help="vocab (cuda 152064, cpu 1031)")
    parser.add_argument("--h", type=int, default=None, help="hidden (cuda 3584, cpu 64)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                        help="time the rich head with top_logprobs=K (1..64)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    # the CPU run only checks the code path, so its shapes are small
    small = args.device == "cpu"
    args.t = args.t or (256 if small else 16384)
    args.v = args.v or (1031 if small else 152064)
    args.h = args.h or (64 if small else 3584)
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < 2:
            print(f"bench_tp_logprobs: needs at least 2 CUDA devices, this machine has {gpus}; "
                  f"nothing measured (--device cpu checks the code path on gloo)")
            return
        args.tp = args.tp or gpus
        if args.tp > gpus:
            sys.exit(f"--tp {args.tp} exceeds the {gpus} CUDA devices")
    args.tp = args.tp or 2
    mp.spawn(run, args=(args, free_port()), nprocs=args.tp, join=True)


if __name__ == "__main__":
    main()
