"""Token embedding and the log-prob head (LM head fused with the log-prob op).

The head never returns logits: it hands them straight to the fused op, either all at
once or, in lean mode, in vocabulary chunks whose (m, s, w, t) partials are merged, so
[rows, V] logits are never held. The chunks are exactly the shards tensor parallelism
will use, so the same path serves both.
"""
from __future__ import annotations

import tokenspeed_ext as tse
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import _default_loader

# logits held at once by the non-lean head: 256 MiB in fp32
MAX_LOGITS_ELEMENTS = 1 << 26


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = _default_loader

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight)


class LogprobHead(nn.Module):
    """log_softmax(hidden @ W^T / T)[target] (and entropy) per row, in fp32.

    ``tied`` reuses the embedding's weight tensor instead of owning one.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tied: VocabEmbedding | None = None):
        super().__init__()
        self.tied = tied
        if tied is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = _default_loader

    def head_weight(self) -> Tensor:
        return self.tied.weight if self.tied is not None else self.weight

    def forward(self, hidden: Tensor, targets: Tensor, temperature: float,
                return_entropy: bool, vocab_chunk: int | None) -> tuple[Tensor, Tensor | None]:
        """hidden [S, H], targets [S] -> (logprobs [S] fp32, entropy [S] fp32 or None)."""
        weight = self.head_weight()
        vocab = weight.shape[0]
        if vocab_chunk is None or vocab_chunk >= vocab:
            # full rows, but a bounded number at a time, so [rows, V] logits stay small
            step = max(1, MAX_LOGITS_ELEMENTS // vocab)
            outs = [tse.logprobs(F.linear(hidden[r:r + step], weight), targets[r:r + step],
                                 temperature, True) for r in range(0, hidden.shape[0], step)]
            lp = torch.cat([o[0] for o in outs])
            return lp, torch.cat([o[1] for o in outs]) if return_entropy else None
        partials = torch.stack([
            tse.logprob_partials(F.linear(hidden, weight[start:start + vocab_chunk]), targets,
                                 start, temperature)
            for start in range(0, vocab, vocab_chunk)])
        lp, ent = tse.combine_logprob_partials(partials)
        return lp, ent if return_entropy else None
