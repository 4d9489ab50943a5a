"""Vocabulary-parallel token embedding; its row loader also serves the log-prob head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parallel.group import tp_group, vocab_range


def vocab_loader(layer: nn.Module):
    """Loads the layer's rows [vocab_start, vocab_end) of an HF [V, H] tensor."""
    def load(param: nn.Parameter, loaded: Tensor, shard: str | int | None = None) -> None:
        expected = (layer.vocab_size, param.shape[1])
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expected shape {expected}, got {tuple(loaded.shape)}")
        param.data.copy_(loaded.narrow(0, layer.vocab_start, param.shape[0]))
    return load


class VocabEmbedding(nn.Module):
    """Vocabulary-parallel: each rank holds rows [vocab_start, vocab_end) (uneven splits
    allowed), looks up the ids it holds, zeros the others, and the group sums."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = tp_group()
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_end = vocab_range(vocab_size, self.tp.rank, self.tp.size)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, hidden_size),
                                   requires_grad=False)
        self.weight.weight_loader = vocab_loader(self)

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))
