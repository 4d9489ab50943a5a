"""The log-prob head: the LM head fused with the log-prob op, never returning logits.

It hands logits straight to the fused op, either whole rows a bounded block at a time or,
in lean mode, in vocabulary chunks whose (m, s, w, t) partials are merged, so [rows, V]
logits are never held. Tensor parallelism shards the vocabulary the same way and merges
the ranks' partials with the same op.
"""
from __future__ import annotations

from dataclasses import dataclass

import tokenspeed_ext as tse
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parallel.group import tp_group, vocab_range
from .embedding import VocabEmbedding, vocab_loader
from .gemm import batch_invariant, in_row_blocks, row_block

# logits held at once by the non-lean head: 256 MiB in fp32
MAX_LOGITS_ELEMENTS = 1 << 26

# aten::mm.dtype: a bf16/fp16 GEMM whose fp32 accumulator is written out unrounded
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def head_logits(hidden: Tensor, weight: Tensor, row_block: int | None = None) -> Tensor:
    """hidden [S, H] @ weight[V, H]^T, in fp32 where the GEMM can write it directly;
    with ``row_block``, on fixed blocks of that many rows (batch-invariant, see gemm.py).

    Rounding bf16 logits costs |logit| * 2^-9 each, the largest error term of a bf16
    scorer; writing the GEMM's fp32 accumulator instead costs one extra pass over the
    (bounded) logits block. Other devices and dtypes fall back to F.linear.
    """
    if (_MM_OUT_DTYPE and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == hidden.dtype):
        def product(rows: Tensor) -> Tensor:
            return torch.mm(rows, weight.t(), out_dtype=torch.float32)
    else:
        def product(rows: Tensor) -> Tensor:
            return F.linear(rows, weight)
    return product(hidden) if row_block is None else in_row_blocks(product, hidden, row_block)


@dataclass(frozen=True)
class HeadOptions:
    """How the head computes, fixed when the model is built.

    vocab_chunk: lean mode's vocabulary chunk (tp_size 1), or None for whole rows a
    bounded block at a time. gather_logits: under tensor parallelism, all-gather the
    logits instead of exchanging the [S, 4] partials.
    """
    vocab_chunk: int | None = None
    gather_logits: bool = False


class LogprobHead(nn.Module):
    """log_softmax(hidden @ W^T / T)[target] (and entropy) per row, in fp32.

    ``tied`` reuses the embedding's weight tensor instead of owning one. Under tensor
    parallelism each rank holds the vocabulary rows its embedding would, computes the
    (m, s, w, t) partials of its shard, and the ranks exchange those [S, 4] (16 bytes a
    row) and merge them in rank order, so every rank gets the same scores. The
    ``gather_logits`` option all-gathers [rows, V] logits instead.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tied: VocabEmbedding | None = None,
                 options: HeadOptions = HeadOptions()):
        super().__init__()
        self.tied = tied
        self.options = options
        self.invariant = batch_invariant()
        self.tp = tp_group()
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_end = vocab_range(vocab_size, self.tp.rank, self.tp.size)
        if tied is None:
            self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start,
                                                   hidden_size), requires_grad=False)
            self.weight.weight_loader = vocab_loader(self)

    def head_weight(self) -> Tensor:
        return self.tied.weight if self.tied is not None else self.weight

    def forward(self, hidden: Tensor, targets: Tensor, temperature: float,
                return_entropy: bool, validate: bool = False) -> tuple[Tensor, Tensor | None]:
        """hidden [S, H], targets [S] -> (logprobs [S] fp32, entropy [S] fp32 or None).

        The ops run without their targets check (a host round trip each): a target
        outside the vocabulary scores -inf. ``validate`` checks the targets once against
        the whole vocabulary first (most paths' ops see only a chunk or shard of it).
        """
        if validate:
            self._check_targets(targets)
        if self.tp.size > 1:
            if self.options.gather_logits:
                lp, ent = self._gathered_logits(hidden, targets, temperature)
            else:
                lp, ent = tse.combine_logprob_partials(
                    self.tp.all_gather(self._shard_partials(hidden, targets, temperature)))
            return lp, ent if return_entropy else None
        weight = self.head_weight()
        vocab, vocab_chunk = weight.shape[0], self.options.vocab_chunk
        if vocab_chunk is None or vocab_chunk >= vocab:
            # full rows, but a bounded number at a time, so [rows, V] logits stay small
            step, block = self._rows_at_once(vocab, hidden)
            outs = [tse.logprobs(head_logits(hidden[r:r + step], weight, block),
                                 targets[r:r + step], temperature, True, validate=False)
                    for r in range(0, hidden.shape[0], step)]
            lp = torch.cat([o[0] for o in outs])
            return lp, torch.cat([o[1] for o in outs]) if return_entropy else None
        block = row_block(hidden) if self.invariant else None
        partials = torch.stack([
            tse.logprob_partials(head_logits(hidden, weight[start:start + vocab_chunk], block),
                                 targets, start, temperature, validate=False)
            for start in range(0, vocab, vocab_chunk)])
        lp, ent = tse.combine_logprob_partials(partials)
        return lp, ent if return_entropy else None

    def _rows_at_once(self, width: int, hidden: Tensor) -> tuple[int, int | None]:
        """Rows per block of [rows, width] logits (bounded), and the row block their GEMM
        runs in: that same count in batch-invariant mode (capped), else none."""
        step = max(1, MAX_LOGITS_ELEMENTS // width)
        if not self.invariant:
            return step, None
        step = min(step, row_block(hidden))
        return step, step

    def _check_targets(self, targets: Tensor) -> None:
        outside = (targets < 0) | (targets >= self.vocab_size)
        if outside.any():
            row = int(outside.nonzero()[0, 0])
            raise RuntimeError(f"score_targets[{row}] is {int(targets[row])}, outside the "
                               f"vocabulary [0, {self.vocab_size})")

    def _shard_partials(self, hidden: Tensor, targets: Tensor, temperature: float) -> Tensor:
        """[S, 4] partials of this rank's vocabulary shard, in bounded row blocks."""
        weight = self.head_weight()
        step, block = self._rows_at_once(weight.shape[0], hidden)
        return torch.cat([
            tse.logprob_partials(head_logits(hidden[r:r + step], weight, block),
                                 targets[r:r + step], self.vocab_start, temperature,
                                 validate=False)
            for r in range(0, hidden.shape[0], step)])

    def _gathered_logits(self, hidden: Tensor, targets: Tensor, temperature: float
                         ) -> tuple[Tensor, Tensor]:
        """All-gather each row block's logits and score full rows. Blocks are sized by
        the whole vocabulary, so every rank runs the same number of collectives."""
        weight = self.head_weight()
        size = self.tp.size
        bounds = [vocab_range(self.vocab_size, r, size) for r in range(size)]
        width = max(end - start for start, end in bounds)
        step, block = self._rows_at_once(size * width, hidden)
        lps, ents = [], []
        for r in range(0, hidden.shape[0], step):
            local = head_logits(hidden[r:r + step], weight, block)
            # all_gather needs equal shapes: pad the shorter shards, then cut the padding
            local = F.pad(local, (0, width - local.shape[1]))
            shards = self.tp.all_gather(local)
            logits = torch.cat([shards[i, :, :end - start]
                                for i, (start, end) in enumerate(bounds)], dim=1)
            lp, ent = tse.logprobs(logits, targets[r:r + step], temperature, True,
                                   validate=False)
            lps.append(lp)
            ents.append(ent)
        return torch.cat(lps), torch.cat(ents)
