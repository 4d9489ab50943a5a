"""ModelRunner: one scheduler Batch -> one packed forward -> log-probs of its scored rows.

No padding anywhere: the batch's N tokens run through the model as one [N, H] tensor,
attention finds each request's context through the page table, and only the S scored
rows reach the final norm and the log-prob head.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .kv_cache import KVCache
from .layers.attention import AttentionMetadata


@dataclass
class BatchScores:
    """Log-probs (and entropy) of one batch's scored rows, on the CPU, in entry order."""
    log_probs: Tensor
    entropy: Tensor | None


def _int32(buffer, device: torch.device) -> Tensor:
    # the scheduler's buffers are read-only and live only as long as the batch: the copy
    # (to the device or fresh CPU memory) is what makes the tensor safe to keep, so
    # torch's warning about non-writable buffers does not apply
    if not len(memoryview(buffer)):
        return torch.empty(0, dtype=torch.int32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(buffer, dtype=torch.int32)
    return t.to(device, copy=True)


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: KVCache, device: torch.device,
                 lean_vocab_chunk: int | None, gather_logits: bool = False):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.lean_vocab_chunk = lean_vocab_chunk
        self.gather_logits = gather_logits

    @torch.inference_mode()
    def run(self, batch, temperature: float, return_entropy: bool) -> BatchScores:
        dev = self.device
        input_ids = _int32(batch.input_ids, dev)
        positions = _int32(batch.positions, dev)
        score_rows = _int32(batch.score_rows, dev)
        targets = _int32(batch.score_targets, dev)
        meta = AttentionMetadata(
            slot_mapping=_int32(batch.slot_mapping, dev),
            page_table=_int32(batch.page_table, dev).view(batch.num_requests, batch.max_pages),
            cu_seqlens_q=_int32(batch.cu_seqlens_q, dev),
            kv_lens=_int32(batch.kv_lens, dev),
            kv_cache=self.kv_cache,
            max_seqlen_q=max((e.end - e.begin for e in batch.entries), default=0))
        hidden = self.model(input_ids, positions, meta, score_rows)
        if hidden.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.float32)
            return BatchScores(empty, empty if return_entropy else None)
        lp, ent = self.model.lm_head(hidden, targets, temperature, return_entropy,
                                     self.lean_vocab_chunk, self.gather_logits)
        return BatchScores(lp.cpu(), ent.cpu() if ent is not None else None)
