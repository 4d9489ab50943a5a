"""Paged attention: write this step's K/V into the pool, then attend over each request's
whole cached sequence. Everything about the batch layout arrives in ``AttentionMetadata``."""
from __future__ import annotations

from dataclasses import dataclass

import tokenspeed_ext as tse
from torch import Tensor, nn

from ..kv_cache import KVCache
from .moe import RoutingMetadata


@dataclass
class AttentionMetadata:
    """One packed forward. N tokens of B requests; all index tensors int32 on the device.

    slot_mapping [N]: flat pool slot of each token; page_table [B, max_pages];
    cu_seqlens_q [B+1]: token rows of each request; kv_lens [B]: its cached length
    including this step's tokens; max_seqlen_q: the most new tokens of any request.
    validate: layer 0 checks these values against the pool (host round trips); the
    scheduler's metadata needs no check, so the engine turns it on only for debugging.
    routing: forced and captured experts of the MoE layers (None: route freely, record
    nothing).
    """
    slot_mapping: Tensor
    page_table: Tensor
    cu_seqlens_q: Tensor
    kv_lens: Tensor
    kv_cache: KVCache
    max_seqlen_q: int
    validate: bool = False
    routing: RoutingMetadata | None = None


class PagedAttention(nn.Module):
    def __init__(self, layer_id: int, scale: float):
        super().__init__()
        self.layer_id = layer_id
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata) -> Tensor:
        """q [N, Hq, D], k/v [N, Hk, D] -> [N, Hq, D]."""
        k_cache, v_cache = meta.kv_cache.layer(self.layer_id)
        # the metadata is the same for every layer of the forward: one check is enough
        validate = meta.validate and self.layer_id == 0
        tse.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, validate)
        return tse.paged_prefill_attention(q, k_cache, v_cache, meta.page_table,
                                           meta.cu_seqlens_q, meta.kv_lens, self.scale,
                                           meta.max_seqlen_q, validate)
