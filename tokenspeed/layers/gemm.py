"""The matrix products of the layers, plain or batch-invariant.

A GEMM library picks its algorithm (tile shape, split-K) from the problem's shape, so a
row's result can change with the number of rows it is computed with: with the other
sequences of a batch, the chunk size, whether its prefix came from the cache (on the
CPU too: a product of one to three fp32 rows takes another path than one of eight). In
batch-invariant mode every product runs on fixed blocks of ``row_block`` rows (the last
one zero-padded): one shape, one algorithm, and each row's reduction order depends on
nothing but its own values. Layers read the mode when they are built, as they read
their tensor-parallel group.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per block, by device type: on a GPU large enough to keep a Hopper's tensor cores
# busy, so that mostly the zero padding of a call's last batch costs time; on the CPU a
# few cache-sized tiles, as its GEMMs reach full speed at small row counts.
ROW_BLOCK = {"cuda": 2048, "cpu": 64}

_BATCH_INVARIANT = False


def batch_invariant() -> bool:
    """The mode of the layers being built now."""
    return _BATCH_INVARIANT


@contextmanager
def building_batch_invariant(enabled: bool) -> Iterator[None]:
    global _BATCH_INVARIANT
    previous, _BATCH_INVARIANT = _BATCH_INVARIANT, enabled
    try:
        yield
    finally:
        _BATCH_INVARIANT = previous


def row_block(x: Tensor) -> int:
    return ROW_BLOCK[x.device.type]


def in_row_blocks(product: Callable[[Tensor, Tensor], Tensor], x: Tensor, block: int,
                  out: Tensor) -> Tensor:
    """product(rows, dest) over x's rows in blocks of exactly ``block`` rows (the last
    zero-padded), each block's result written by the product into its rows of ``out``
    (no concatenation pass): the product never sees another row count."""
    n = x.shape[0]
    full = n - n % block
    for i in range(0, full, block):
        product(x[i:i + block], out[i:i + block])
    if full < n:
        tail = x.new_zeros((block, *x.shape[1:]))
        tail[:n - full] = x[full:]
        padded = out.new_empty((block, *out.shape[1:]))
        product(tail, padded)
        out[full:] = padded[:n - full]
    return out


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, invariant: bool) -> Tensor:
    """x W^T (+ bias), on fixed row blocks when ``invariant``."""
    if not invariant:
        return F.linear(x, weight, bias)
    def product(rows: Tensor, dest: Tensor) -> Tensor:
        if bias is None:
            return torch.mm(rows, weight.t(), out=dest)
        return torch.addmm(bias, rows, weight.t(), out=dest)

    rows = x.reshape(-1, x.shape[-1])
    out = in_row_blocks(product, rows, row_block(x), x.new_empty(rows.shape[0], weight.shape[0]))
    return out.view(*x.shape[:-1], weight.shape[0])
