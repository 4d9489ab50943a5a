"""RMSNorm computed in fp32 and cast back, as HF's Llama/Qwen do, with the residual add
of the decoder layer fused in."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenspeed_ext import rms_norm

from .weights import default_loader


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.weight.weight_loader = default_loader

    def forward(self, x: Tensor, residual: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x) of x [N, H] or [N, M, H]; with residual, h = x + residual (rounded to
        the dtype, as HF adds it) and returns (norm(h), h), h being the new residual."""
        return rms_norm(x, self.weight, self.eps, residual)
