"""The paged K/V pool: per layer one K and one V tensor [num_pages, page_size, Hk, D]."""
from __future__ import annotations

import torch
from torch import Tensor


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.num_pages, self.page_size = num_pages, page_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def layer(self, layer_id: int) -> tuple[Tensor, Tensor]:
        return self.k[layer_id], self.v[layer_id]

    @property
    def num_tokens(self) -> int:
        return self.num_pages * self.page_size
