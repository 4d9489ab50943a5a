"""The loader of parameters that take an HF tensor whole (no sharding, no fusing)."""
from __future__ import annotations

from torch import Tensor, nn


def default_loader(param: nn.Parameter, loaded: Tensor,
                   shard: str | int | None = None) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
    param.data.copy_(loaded)
