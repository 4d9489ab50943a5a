"""grouped_gemm alone in a process, for compute-sanitizer's racecheck: inside the pytest
run racecheck stops at the first grouped_gemm test with an internal error ("failed to
handle a hardware exception") that memcheck does not reproduce, while both kernel paths
run alone are clean (bench/NOTES.md, 2026-12-02 third session). scripts/run_gpu.sh runs
this for racecheck in place of those tests.

    python3 scripts/grouped_gemm_probe.py K COUNTS [bad] [i32] [fp16]
e.g. `72 0,130,3,0,200 bad` (tensor cores, five experts, then unchecked offsets).
"""
import itertools
import sys

import torch

import tokenspeed_ext as tse

k = int(sys.argv[1])
counts = [int(c) for c in sys.argv[2].split(",")]
flags = set(sys.argv[3:])
dtype = torch.float16 if "fp16" in flags else torch.bfloat16
offsets_dtype = torch.int32 if "i32" in flags else torch.int64
offsets = torch.tensor([0, *itertools.accumulate(counts)], device="cuda", dtype=offsets_dtype)
x = torch.randn(int(offsets[-1]), k, device="cuda").to(dtype)
w = torch.randn(len(counts), 136, k, device="cuda").to(dtype)
want = torch.cat([x[a:b].float() @ w[e].float().t() for e, (a, b) in
                  enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])
got = tse.grouped_gemm(x, w, offsets).float()
assert torch.allclose(got, want, rtol=2e-2, atol=2e-2), (got - want).abs().max()
if "bad" in flags:  # out of order and past M: writes only inside the output
    bad = torch.tensor([-5, 200, 100, 400, 300, 1000][:len(counts) + 1], device="cuda",
                       dtype=offsets_dtype)
    tse.grouped_gemm(x, w, bad, validate=False)
torch.cuda.synchronize()
print("grouped_gemm probe ok", k, counts, sorted(flags))
