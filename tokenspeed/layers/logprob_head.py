"""The log-prob head: the LM head fused with the log-prob op, never returning logits.

On CUDA the plain scores come from head_logprob_partials, which folds the logits into
(m, s, w, t) partials inside the GEMM (fused on sm_90) and never writes them. Elsewhere,
and for the sampler outputs, it hands logits straight to the log-prob ops, either whole
rows a bounded block at a time or, in lean mode, in vocabulary chunks whose partials are
merged, so [rows, V] logits are never held. Tensor parallelism shards the vocabulary the
same way and merges the ranks' partials with the same op.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import tokenspeed_ext as tse
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parallel.group import tp_group, vocab_range
from .embedding import VocabEmbedding, vocab_loader
from .gemm import batch_invariant, in_row_blocks, row_block
from .sampler_filters import (RichRows, RowOptions, finish_rows, gather_token_logits,
                              in_order_sum, merge_candidates, merge_state)

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
    fp32_out = (_MM_OUT_DTYPE and hidden.is_cuda and weight.dtype == hidden.dtype
                and hidden.dtype in (torch.bfloat16, torch.float16))
    if row_block is None:
        if fp32_out:
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        return F.linear(hidden, weight)
    out = hidden.new_empty(hidden.shape[0], weight.shape[0],
                           dtype=torch.float32 if fp32_out else hidden.dtype)
    if fp32_out and hasattr(torch.ops.aten.mm, "dtype_out"):
        def product(rows: Tensor, dest: Tensor) -> Tensor:
            return torch.mm(rows, weight.t(), out_dtype=torch.float32, out=dest)
    elif fp32_out:
        def product(rows: Tensor, dest: Tensor) -> Tensor:
            return dest.copy_(torch.mm(rows, weight.t(), out_dtype=torch.float32))
    else:
        def product(rows: Tensor, dest: Tensor) -> Tensor:
            return torch.mm(rows, weight.t(), out=dest)
    return in_row_blocks(product, hidden, row_block, out)


@dataclass(frozen=True)
class HeadOptions:
    """How the head computes, fixed when the model is built.

    vocab_chunk: lean mode's vocabulary chunk (tp_size 1), or None for whole rows a
    bounded block at a time. gather_logits: under tensor parallelism, all-gather the
    logits instead of exchanging the [S, 4] partials. fused: on CUDA, take the plain
    scores' partials from head_logprob_partials (never writing logits) rather than
    from logits chunks or blocks.
    """
    vocab_chunk: int | None = None
    gather_logits: bool = False
    fused: bool = True


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
        if self._fused(hidden):
            lp, ent = tse.combine_logprob_partials(
                self._fused_partials(hidden, targets, temperature)[None])
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

    def _fused(self, hidden: Tensor) -> bool:
        """Whether the partials come from head_logprob_partials, the logits never written:
        on CUDA."""
        return self.options.fused and hidden.is_cuda

    def _fused_partials(self, hidden: Tensor, targets: Tensor, temperature: float) -> Tensor:
        """[S, 4] partials of this rank's vocabulary from head_logprob_partials, asked to
        be batch-invariant in that mode (its fused kernel is; its fallback, on other
        devices or in fp32, then pads its row blocks)."""
        return tse.head_logprob_partials(hidden, self.head_weight(), targets, self.vocab_start,
                                         temperature, validate=False,
                                         batch_invariant=self.invariant)

    def _rows_at_once(self, width: int, hidden: Tensor) -> tuple[int, int | None]:
        """Rows per block of [rows, width] logits (bounded), and the row block their GEMM
        runs in: that same count in batch-invariant mode (capped), else none."""
        step = max(1, MAX_LOGITS_ELEMENTS // width)
        if not self.invariant:
            return step, None
        step = min(step, row_block(hidden))
        return step, step

    def forward_rich(self, hidden: Tensor, targets: Tensor, temperature: float,
                     opts: RowOptions, validate: bool = False) -> RichRows:
        """The sampler-filtered log-probs, entropy, top-k and requested-id log-probs of
        every row (sampler_filters.py), from the same read of the logits that gives the
        partials, in bounded row blocks; a second pass over a block's logits only for
        the rows whose kept set the candidates do not settle. The rows in ``opts.plain``
        get their log-prob and entropy from ``forward``, as they would in a batch without
        rich rows, and placeholders for the extra outputs (id -1, log-prob -inf: nothing
        reads them); only ``opts.rich`` go through the rich pass."""
        if validate:
            self._check_targets(targets)
        if opts.plain is None:
            return self._rich_rows(hidden, targets, temperature, opts)
        rows = hidden.shape[0]
        out = RichRows(hidden.new_empty(rows, dtype=torch.float32),
                       hidden.new_empty(rows, dtype=torch.float32), None, None, None)
        if opts.top_logprobs:
            out.top_ids = targets.new_full((rows, opts.top_logprobs), -1, dtype=torch.int64)
            out.top_logprobs = hidden.new_full((rows, opts.top_logprobs), -math.inf,
                                               dtype=torch.float32)
        if opts.token_ids is not None:
            out.token_logprobs = hidden.new_full(opts.token_ids.shape, -math.inf,
                                                 dtype=torch.float32)
        lp, ent = self(hidden.index_select(0, opts.plain), targets.index_select(0, opts.plain),
                       temperature, True)
        out.log_probs.index_copy_(0, opts.plain, lp)
        out.entropy.index_copy_(0, opts.plain, ent)
        if opts.rich is not None:
            some = self._rich_rows(hidden.index_select(0, opts.rich),
                                   targets.index_select(0, opts.rich), temperature,
                                   opts.take(opts.rich))
            for name, value in vars(some).items():
                if value is not None:
                    getattr(out, name).index_copy_(0, opts.rich, value)
        return out

    def _rich_rows(self, hidden: Tensor, targets: Tensor, temperature: float,
                   opts: RowOptions) -> RichRows:
        """forward_rich of rows that are all rich."""
        step, block = self._rows_at_once(self._block_width(), hidden)
        blocks = [self._rich_block(hidden[r:r + step], targets[r:r + step], temperature,
                                   opts.rows(r, r + step), block)
                  for r in range(0, hidden.shape[0], step)]
        return RichRows(*(None if parts[0] is None else torch.cat(parts)
                          for parts in zip(*(vars(b).values() for b in blocks))))

    def _block_width(self) -> int:
        """Logits columns a row of a block holds at once. Under tensor parallelism it is
        the widest shard's (rank 0's), so that every rank cuts the same blocks and runs
        the same collectives."""
        width = self.head_weight().shape[0]
        if self.tp.size > 1:
            start, end = vocab_range(self.vocab_size, 0, self.tp.size)
            return (end - start) * (self.tp.size if self.options.gather_logits else 1)
        chunk = self.options.vocab_chunk
        if self.tp.size == 1 and chunk is not None and chunk < width:
            return chunk
        return width

    def _logit_sources(self, hidden: Tensor, block: int | None
                       ) -> list[tuple[Callable[[], Tensor], int]]:
        """(logits of a vocabulary piece, its first id) that together cover what this rank
        scores: its shard, the lean chunks, or the gathered full rows. Each call of a
        piece computes its logits again (a lean chunk is never kept), except a whole-row
        block, which is kept for a second pass."""
        weight = self.head_weight()
        if self.tp.size > 1 and self.options.gather_logits:
            full = self._gather_block(hidden, block)
            return [(lambda: full, 0)]
        if self.tp.size > 1:
            local = head_logits(hidden, weight, block)
            return [(lambda: local, self.vocab_start)]
        chunk = self.options.vocab_chunk
        if chunk is None or chunk >= weight.shape[0]:
            whole = head_logits(hidden, weight, block)
            return [(lambda: whole, 0)]
        return [((lambda s=start: head_logits(hidden, weight[s:s + chunk], block)), start)
                for start in range(0, weight.shape[0], chunk)]

    def _across_ranks(self, x: Tensor) -> Tensor:
        """[C, ...] per-piece values of this rank -> [ranks * C, ...] in rank order (the
        same on every rank); unchanged without a vocabulary split across ranks."""
        if self.tp.size == 1 or self.options.gather_logits:
            return x
        return self.tp.all_gather(x).flatten(0, 1)

    def _rich_block(self, hidden: Tensor, targets: Tensor, temperature: float,
                    opts: RowOptions, block: int | None) -> RichRows:
        sources = self._logit_sources(hidden, block)
        parts, vals, ids, tok = [], [], [], []
        for logits, start in sources:
            x = logits()
            if opts.needs_candidates:
                p, v, i = tse.logprob_topk_partials(x, targets, start, temperature,
                                                    opts.candidates, validate=False)
                vals.append(v)
                ids.append(i)
            else:  # requested ids alone: the plain partials, no candidates
                p = tse.logprob_partials(x, targets, start, temperature, validate=False)
            parts.append(p)
            if opts.token_ids is not None:
                tok.append(gather_token_logits(x, start, opts.token_ids, temperature))
        state = merge_state(self._across_ranks(torch.stack(parts)))
        values = cand_ids = None
        if opts.needs_candidates:
            values, cand_ids = merge_candidates(self._across_ranks(torch.stack(vals)),
                                                self._across_ranks(torch.stack(ids)),
                                                opts.candidates)
        token_x = self._across_ranks(torch.stack(tok)).max(0).values if tok else None

        def mass_above(rows: Tensor, thresholds: Tensor, ref_m: Tensor) -> Tensor:
            # the rows' logits copied out of the piece (a row's sums depend on its values
            # alone, wherever it sits: the same bits as in the whole block); a lean chunk
            # recomputes the block's product rather than the rows' alone, whose GEMM could
            # round differently from the one the candidates came from
            sums = torch.stack([tse.logprob_mass_above(logits().index_select(0, rows),
                                                       temperature, thresholds, ref_m)
                                for logits, _ in sources])
            return in_order_sum(self._across_ranks(sums))

        return finish_rows(state, values, cand_ids, token_x, opts, mass_above)

    def _gather_block(self, hidden: Tensor, block: int | None) -> Tensor:
        """Full-vocabulary logits [rows, V] of a row block, all-gathered from the ranks'
        shards (padded to equal widths for the collective, the padding cut)."""
        size = self.tp.size
        bounds = [vocab_range(self.vocab_size, r, size) for r in range(size)]
        width = max(end - start for start, end in bounds)
        local = F.pad(head_logits(hidden, self.head_weight(), block),
                      (0, width - self.head_weight().shape[0]))
        shards = self.tp.all_gather(local)
        return torch.cat([shards[i, :, :end - start] for i, (start, end) in enumerate(bounds)],
                         dim=1)

    def _check_targets(self, targets: Tensor) -> None:
        outside = (targets < 0) | (targets >= self.vocab_size)
        if outside.any():
            row = int(outside.nonzero()[0, 0])
            raise RuntimeError(f"score_targets[{row}] is {int(targets[row])}, outside the "
                               f"vocabulary [0, {self.vocab_size})")

    def _shard_partials(self, hidden: Tensor, targets: Tensor, temperature: float) -> Tensor:
        """[S, 4] partials of this rank's vocabulary shard, in bounded row blocks."""
        if self._fused(hidden):
            return self._fused_partials(hidden, targets, temperature)
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
        size = self.tp.size
        bounds = [vocab_range(self.vocab_size, r, size) for r in range(size)]
        width = max(end - start for start, end in bounds)
        step, block = self._rows_at_once(size * width, hidden)
        lps, ents = [], []
        for r in range(0, hidden.shape[0], step):
            logits = self._gather_block(hidden[r:r + step], block)
            lp, ent = tse.logprobs(logits, targets[r:r + step], temperature, True,
                                   validate=False)
            lps.append(lp)
            ents.append(ent)
        return torch.cat(lps), torch.cat(ents)
