"""ModelRunner: one scheduler Batch -> one packed forward -> log-probs of its scored rows.

No padding anywhere: the batch's N tokens run through the model as one [N, H] tensor,
attention finds each request's context through the page table, and only the S scored
rows reach the final norm and the log-prob head. Nothing here waits for the device: the
batch's metadata goes over in one asynchronous copy and its scores stay on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .kv_cache import KVCache
from .layers.attention import AttentionMetadata
from .layers.sampler_filters import RowOptions
from .layers.moe import RoutingMetadata

# the scheduler's int32 arrays of a Batch, in the order they are packed
BATCH_ARRAYS = ("input_ids", "positions", "slot_mapping", "page_table", "cu_seqlens_q",
                "kv_lens", "score_rows", "score_targets")


@dataclass
class BatchScores:
    """Log-probs (and entropy) [S] fp32 of one batch's scored rows, in entry order, on the
    batch's device; they may still be being computed there."""
    log_probs: Tensor
    entropy: Tensor | None
    # the rich outputs asked for: top_ids, top_logprobs [S, k], token_logprobs [S, n]
    extras: dict[str, Tensor] | None = None


def upload(batch, device: torch.device) -> dict[str, Tensor]:
    """The batch's int32 arrays on ``device``, as views of one tensor sent in one copy.

    They are packed into one host tensor first, pinned for CUDA so the copy does not block
    the host; packing also makes them outlive the batch, whose own buffers are valid only
    until it is completed. A fresh host tensor per batch is safe to drop at once: the
    caching host allocator keeps it until its copy has run.
    """
    arrays = [getattr(batch, name) for name in BATCH_ARRAYS]
    sizes = [len(a) for a in arrays]
    host = torch.empty(sum(sizes), dtype=torch.int32, pin_memory=device.type == "cuda")
    for view, array in zip(host.split(sizes), arrays):
        if view.numel():  # an empty array has no buffer torch accepts
            view.copy_(torch.frombuffer(array, dtype=torch.int32))
    return dict(zip(BATCH_ARRAYS, host.to(device, non_blocking=True).split(sizes)))


class ModelRunner:
    """``check_batches`` makes each forward check its metadata and targets against the
    KV pool and vocabulary (host round trips; see EngineConfig)."""

    def __init__(self, model: nn.Module, kv_cache: KVCache, device: torch.device,
                 check_batches: bool = False):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.check_batches = check_batches

    @torch.inference_mode()
    def run(self, batch, temperature: float, return_entropy: bool,
            rich: RowOptions | None = None, routing: RoutingMetadata | None = None
            ) -> BatchScores:
        """``rich``: the rich outputs' per-row options (sampler_filters.py); ``routing``:
        forced experts and capture of an MoE model's batch (routing.py)."""
        t = upload(batch, self.device)
        meta = AttentionMetadata(
            slot_mapping=t["slot_mapping"],
            page_table=t["page_table"].view(batch.num_requests, batch.max_pages),
            cu_seqlens_q=t["cu_seqlens_q"],
            kv_lens=t["kv_lens"],
            kv_cache=self.kv_cache,
            max_seqlen_q=max((e.end - e.begin for e in batch.entries), default=0),
            validate=self.check_batches, routing=routing)
        hidden = self.model(t["input_ids"], t["positions"], meta, t["score_rows"])
        if routing is not None and routing.slot_buffer is not None:
            routing.slot_buffer[t["slot_mapping"].long()] = routing.captured.to(torch.int16)
        if hidden.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.float32, device=self.device)
            return BatchScores(empty, empty if return_entropy else None)
        if rich is not None:
            out = self.model.lm_head.forward_rich(hidden, t["score_targets"], temperature, rich,
                                                  validate=self.check_batches)
            extras = {name: value for name, value in (("top_ids", out.top_ids),
                                                      ("top_logprobs", out.top_logprobs),
                                                      ("token_logprobs", out.token_logprobs))
                      if value is not None}
            return BatchScores(out.log_probs, out.entropy if return_entropy else None, extras)
        lp, ent = self.model.lm_head(hidden, t["score_targets"], temperature, return_entropy,
                                     validate=self.check_batches)
        return BatchScores(lp, ent)
