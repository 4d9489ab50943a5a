"""Mixture-of-experts feed-forward: router, dispatch, grouped expert GEMMs, combine.

Every rank holds every expert's slice of the intermediate dimension (the gate/up rows and
the down columns of its share), so routing is computed identically on every rank from the
replicated router and the same input, and the experts' partial sums are all-reduced like
a row-parallel layer's.

Per forward, ``RoutingMetadata`` (built by the runner) may force experts for some rows
(routing replay) and may ask for the chosen experts of every row (routing capture); each
sparse layer reads and writes its own column ``moe_index`` of those [N, L, k] tensors.

Built in batch-invariant mode (gemm.py), every product of the layer is batch-invariant:
the router and shared-expert gates (with the latter's sigmoid) on fixed row blocks, the
experts through the grouped GEMM op whose sums run in an order fixed by K, the
tensor-parallel sum in rank order. The rest depends on a row's own values only: routing,
SiLU-and-mul, and the combine (fixed slot order); the dispatch moves a row, which changes
nothing in its sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import tokenspeed_ext as tse
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parallel.group import tp_group
from .activation import silu_and_mul
from .gemm import batch_invariant, in_row_blocks, linear, row_block
from .weights import default_loader

# per-expert HF tensors load as (kind, expert) shards; a fused tensor loads whole (None)
GATE, UP, DOWN = "gate", "up", "down"


@dataclass
class RoutingMetadata:
    """forced [N, L, k] int32: experts for each row and sparse layer, a row of -1 routes
    freely (None: every row does); captured [N, L, k] int32: filled with the experts each
    row used (None: not recorded); slot_buffer [num_slots, L, k] int16: where the runner
    then stores captured by the rows' K/V slots."""
    forced: Tensor | None = None
    captured: Tensor | None = None
    slot_buffer: Tensor | None = None


def _grouped_mm_usable(x: Tensor) -> bool:
    # torch's grouped GEMM (CUTLASS, sm_90) is bf16-only there; others take the loop
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, invariant: bool = False
                   ) -> Tensor:
    """Rows offsets[e]:offsets[e+1] of x [M, K] times weight[e]^T ([E, N, K]) -> [M, N].

    ``invariant``: tokenspeed's grouped GEMM, whose sums run in an order fixed by K alone,
    where a library's shape (and so its tiles) follows each expert's row count.
    """
    if invariant:  # offsets come from moe_dispatch
        return tse.grouped_gemm(x, weight, offsets, validate=False)
    if _grouped_mm_usable(x) and x.shape[1] % 8 == 0 and weight.shape[1] % 8 == 0:
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets[1:])
    out = x.new_empty(x.shape[0], weight.shape[1])
    bounds = offsets.tolist()
    for e in range(weight.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            torch.mm(x[a:b], weight[e].t(), out=out[a:b])
    return out


class FusedExperts(nn.Module):
    """E experts' weights as two stacked tensors, HF's in-memory layout: gate_up_proj
    [E, 2 * I_local, H] (gate rows, then up rows) and down_proj [E, H, I_local]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.tp = tp_group()
        self.invariant = batch_invariant()
        assert intermediate_size % self.tp.size == 0, (intermediate_size, self.tp.size)
        self.num_experts, self.size = num_experts, intermediate_size
        self.local = intermediate_size // self.tp.size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.local, hidden_size),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.local),
                                      requires_grad=False)
        for p in (self.gate_up_proj, self.down_proj):
            p.weight_loader = self._load
            p.missing_shards = self._missing

    def _load(self, param: nn.Parameter, loaded: Tensor, shard=None) -> None:
        lo, n = self.tp.rank * self.local, self.local
        hidden = self.down_proj.shape[1]
        if shard is None:  # a fused tensor: every expert at once
            if _is_gate_up(param, self.gate_up_proj):
                expected = (self.num_experts, 2 * self.size, hidden)
                _expect(loaded, expected)
                param.data[:, :n].copy_(loaded[:, lo:lo + n])
                param.data[:, n:].copy_(loaded[:, self.size + lo:self.size + lo + n])
            else:
                _expect(loaded, (self.num_experts, hidden, self.size))
                param.data.copy_(loaded[:, :, lo:lo + n])
            return
        kind, expert = shard
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range: the layer has {self.num_experts}")
        if kind == DOWN:
            _expect(loaded, (hidden, self.size))
            param.data[expert].copy_(loaded[:, lo:lo + n])
        else:
            _expect(loaded, (self.size, hidden))
            start = 0 if kind == GATE else n
            param.data[expert, start:start + n].copy_(loaded[lo:lo + n])

    def _missing(self, param: nn.Parameter, loaded: set) -> list[str]:
        """The HF tensors still missing for ``param`` given the shards loaded into it."""
        if None in loaded:
            return []
        kinds = (GATE, UP) if _is_gate_up(param, self.gate_up_proj) else (DOWN,)
        return [f"{e}.{kind}_proj" for e in range(self.num_experts) for kind in kinds
                if (kind, e) not in loaded]

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """x [T, H], ids [T, k] int32, weights [T, k] fp32 -> this rank's partial [T, H]."""
        offsets, sorted_tokens, pair_rows = tse.moe_dispatch(ids, self.num_experts,
                                                             validate=False)
        xs = x.index_select(0, sorted_tokens)
        h = silu_and_mul(grouped_linear(xs, self.gate_up_proj, offsets, self.invariant))
        return tse.moe_combine(grouped_linear(h, self.down_proj, offsets, self.invariant),
                               pair_rows, weights)


def _is_gate_up(param: Tensor, gate_up: Tensor) -> bool:
    # by shape, as the loader's shape checks run on meta copies; the two never agree
    # ([E, 2I, H] vs [E, H, I])
    return tuple(param.shape) == tuple(gate_up.shape)


def _expect(t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"expected shape {shape}, got {tuple(t.shape)}")


class SparseMoE(nn.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert, ``shared``: an MLP module
    whose output is already summed over ranks)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 renormalize: bool, moe_index: int, shared: nn.Module | None = None):
        super().__init__()
        self.tp = tp_group()
        self.invariant = batch_invariant()
        self.top_k, self.renormalize, self.moe_index = top_k, renormalize, moe_index
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.gate.weight.weight_loader = default_loader
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = shared
        if shared is not None:
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
            self.shared_expert_gate.weight.requires_grad_(False)
            self.shared_expert_gate.weight.weight_loader = default_loader

    def forward(self, x: Tensor, routing: RoutingMetadata | None) -> Tensor:
        forced = captured = None
        if routing is not None:
            forced = None if routing.forced is None else routing.forced[:, self.moe_index]
            captured = routing.captured
        logits = linear(x, self.gate.weight, None, self.invariant)
        weights, ids = tse.moe_route(logits, self.top_k, self.renormalize, forced,
                                     validate=False)
        if captured is not None:
            captured[:, self.moe_index].copy_(ids)
        out = self.experts(x, ids, weights)
        if self.tp.size > 1:
            out = self.tp.all_reduce(out, ordered=self.invariant)
        if self.shared_expert is not None:
            out = out + self._shared_gate(x) * self.shared_expert(x)
        return out

    def _shared_gate(self, x: Tensor) -> Tensor:
        """sigmoid(shared_expert_gate(x)) [T, 1]. Batch-invariant on whole row blocks:
        torch's CPU sigmoid rounds differently in its vector body and its scalar tail, so
        in a [T, 1] tensor a token's gate would depend on its place; a block whose size is
        a multiple of every vector width keeps every token in the body."""
        weight = self.shared_expert_gate.weight
        if not self.invariant:
            return torch.sigmoid(F.linear(x, weight))

        def gate(rows: Tensor, dest: Tensor) -> Tensor:
            return torch.sigmoid(F.linear(rows, weight), out=dest)
        return in_row_blocks(gate, x, row_block(x), x.new_empty(x.shape[0], weight.shape[0]))
