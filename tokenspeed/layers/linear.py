"""Linear layers whose parameters load (and shard) HF checkpoint tensors themselves.

Column-parallel layers split the output dimension across the tensor-parallel group,
row-parallel ones the input dimension; fused layers (qkv, gate_up) place each HF tensor
in its slice of the fused weight. The model files only name shards, never ranks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..parallel.group import kv_head_range, tp_group
from .gemm import batch_invariant, linear
from .weights import default_loader


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's rows (outputs) made of named shards, each split over ranks.

    ``shard_sizes`` maps a shard id to its full (unsplit) output size, in the order the
    shards are laid out; a plain column-parallel layer has one shard, ``None``. Outputs
    stay sharded: the row-parallel layer after it takes them as its inputs.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str | int | None, int],
                 bias: bool = False):
        super().__init__()
        group = tp_group()
        self.tp_rank, self.tp_size = group.rank, group.size
        self.invariant = batch_invariant()
        # shard -> (start in the local weight, local rows, start in the HF tensor, HF rows)
        self.offsets: dict[str | int | None, tuple[int, int, int, int]] = {}
        local_total = 0
        for shard, size in shard_sizes.items():
            local, src = self.local_rows(shard, size)
            self.offsets[shard] = (local_total, local, src, size)
            local_total += local
        self.weight = _param(local_total, in_features)
        self.weight.weight_loader = self._load
        self.bias = None
        if bias:
            self.bias = _param(local_total)
            self.bias.weight_loader = self._load

    def local_rows(self, shard: str | int | None, size: int) -> tuple[int, int]:
        """(rows this rank holds, their first row in the HF tensor) of one shard."""
        assert size % self.tp_size == 0, (shard, size, self.tp_size)
        local = size // self.tp_size
        return local, self.tp_rank * local

    def _load(self, param: nn.Parameter, loaded: Tensor, shard: str | int | None = None) -> None:
        if shard not in self.offsets:
            raise ValueError(f"unknown shard {shard!r}; this layer has {list(self.offsets)}")
        start, local, src, size = self.offsets[shard]
        expected = (size, *param.shape[1:])
        if tuple(loaded.shape) != expected:
            raise ValueError(f"shard {shard!r}: expected shape {expected}, "
                             f"got {tuple(loaded.shape)}")
        param.data.narrow(0, start, local).copy_(loaded.narrow(0, src, local))

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.invariant)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's columns (inputs) split over ranks; each rank's partial product
    is all-reduced over the group (not at tp_size 1), then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.tp = tp_group()
        self.tp_rank, self.tp_size = self.tp.rank, self.tp.size
        self.invariant = batch_invariant()
        assert in_features % self.tp_size == 0, (in_features, self.tp_size)
        self.local_in = in_features // self.tp_size
        self.weight = _param(out_features, self.local_in)
        self.weight.weight_loader = self._load
        self.bias = None
        if bias:
            self.bias = _param(out_features)
            self.bias.weight_loader = default_loader

    def _load(self, param: nn.Parameter, loaded: Tensor, shard: str | int | None = None) -> None:
        expected = (param.shape[0], self.local_in * self.tp_size)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expected shape {expected}, got {tuple(loaded.shape)}")
        param.data.copy_(loaded.narrow(1, self.tp_rank * self.local_in, self.local_in))

    def forward(self, x: Tensor) -> Tensor:
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias, self.invariant)
        y = self.tp.all_reduce(linear(x, self.weight, None, self.invariant),
                               ordered=self.invariant)
        return y if self.bias is None else y + self.bias


class QKVLinear(ColumnParallelLinear):
    """The fused q/k/v projection; HF's q_proj, k_proj, v_proj load as shards q, k, v.

    q heads are split over ranks; KV heads too, or, when ranks outnumber them, each rank
    holds the one KV head its q heads attend with (see ``parallel.group.kv_head_range``).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False):
        self.head_dim, self.num_kv_heads = head_dim, num_kv_heads
        super().__init__(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                       "v": num_kv_heads * head_dim}, bias=bias)
        self.q_size = self.offsets["q"][1]
        self.kv_size = self.offsets["k"][1]

    def local_rows(self, shard: str | int | None, size: int) -> tuple[int, int]:
        if shard == "q":
            return super().local_rows(shard, size)
        first, end = kv_head_range(self.num_kv_heads, self.tp_rank, self.tp_size)
        return (end - first) * self.head_dim, first * self.head_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return super().forward(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
