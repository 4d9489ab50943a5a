"""One call of the top-k log-prob op on the benchmark's shape, for ncu (the chunk kernel,
then the row top-k kernel, of the second call):
    ncu -k regex:"chunk_kernel|row_topk" -c 2 --launch-skip 2 python3 scripts/profile_topk.py [k]"""
import sys

import torch

import tokenspeed_ext as tse

k = int(sys.argv[1]) if len(sys.argv) > 1 else 20
gen = torch.Generator("cuda").manual_seed(0)
x = torch.randn(16384, 151936, device="cuda", generator=gen).mul_(3).to(torch.bfloat16)
t = torch.randint(0, 151936, (16384,), device="cuda", generator=gen)
for _ in range(2):
    tse.logprob_topk_partials(x, t, 0, 1.0, k, validate=False)
torch.cuda.synchronize()
