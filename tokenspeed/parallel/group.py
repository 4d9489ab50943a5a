"""Who am I in tensor parallelism: this rank's TP group, its collectives and the
agreement every call starts with, the construction context layers shard by, and the
arithmetic of what each rank holds. Imported by the layers; imports nothing above it.

At tp_size 1 nothing here runs a collective.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in its tensor-parallel group. ``group`` is the torch process
    group (None at size 1); collectives' tensors live on ``device`` (cuda for NCCL)."""
    rank: int = 0
    size: int = 1
    group: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def all_reduce(self, x: Tensor, ordered: bool = False) -> Tensor:
        """The sum of x over the ranks. ``ordered`` adds the ranks' tensors in rank order
        after an all-gather, so each element's sum is the same whatever the tensor's size
        (a collective library may pick its summation order by message size)."""
        if not ordered:
            dist.all_reduce(x, group=self.group)
            return x
        parts = self.all_gather(x)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def all_gather(self, x: Tensor) -> Tensor:
        """x [...] from every rank -> [size, ...] in rank order."""
        out = x.new_empty((self.size, *x.shape))
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=self.group)
        return out

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def validated(self, check: Callable[[], T], fingerprint: Callable[[T], int] | None = None
                  ) -> T:
        """Run ``check`` (input validation) on every rank, then agree before any real
        collective: if it raised on any rank, or ranks were given different input (by
        ``fingerprint``), every rank raises instead of some waiting forever."""
        if self.size == 1:
            return check()
        error, value, digest = None, None, 0
        try:
            value = check()
            if fingerprint is not None:
                digest = fingerprint(value)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the agreement
            error = e
        # a signed 63-bit digest fits the int64 exchange
        state = torch.tensor([error is not None, digest], dtype=torch.int64, device=self.device)
        flags = self.all_gather(state).tolist()
        if error is not None:
            raise error
        failed = [r for r, (bad, _) in enumerate(flags) if bad]
        if failed:
            raise ValueError(f"tensor-parallel rank(s) {failed} rejected this call "
                             f"(their error names the cause); nothing ran")
        differ = [r for r, (_, d) in enumerate(flags) if d != flags[0][1]]
        if differ:
            raise ValueError(f"tensor-parallel ranks {differ} were given different input "
                             f"than rank 0; every rank must make the same call")
        return value


_GROUP = TPGroup()


def tp_group() -> TPGroup:
    """The group that layers being constructed now shard over."""
    return _GROUP


@contextmanager
def building_with(group: TPGroup) -> Iterator[None]:
    """Layers constructed inside shard over ``group`` (they keep it for their forward)."""
    global _GROUP
    previous, _GROUP = _GROUP, group
    try:
        yield
    finally:
        _GROUP = previous


def vocab_range(vocab: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's [start, end) of the vocabulary; the first vocab % size ranks hold one more."""
    base, extra = divmod(vocab, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's [first, end) KV heads: split when size divides them, else each head is
    replicated on size / num_kv_heads consecutive ranks (those holding its q heads)."""
    if size <= num_kv_heads:
        local = num_kv_heads // size
        return rank * local, (rank + 1) * local
    head = rank // (size // num_kv_heads)
    return head, head + 1


def check_shardable(config: Any, size: int) -> None:
    """ValueError naming the first model dimension that ``size`` ranks cannot split."""
    if size == 1:
        return
    heads, kv = config.num_heads, config.num_kv_heads
    if heads % size:
        raise ValueError(f"tp_size {size} does not divide num_attention_heads {heads}")
    if (kv % size) if size <= kv else (size % kv):
        raise ValueError(f"tp_size {size} and num_key_value_heads {kv}: one must divide "
                         f"the other (KV heads are split, or replicated when tp_size > {kv})")
    if config.intermediate_size % size:
        raise ValueError(f"tp_size {size} does not divide intermediate_size "
                         f"{config.intermediate_size}")
    moe = getattr(config, "moe", None)
    for name in ("intermediate_size", "shared_expert_intermediate_size"):
        value = getattr(moe, name, 0) if moe is not None else 0
        if value % size:  # every rank holds each expert's slice of it
            raise ValueError(f"tp_size {size} does not divide the experts' {name} {value}")
    if config.vocab_size < size:
        raise ValueError(f"tp_size {size} exceeds the vocabulary of {config.vocab_size}")


def sequences_fingerprint(seqs: Sequence[tuple[list[int], list[int]]], *extra: object) -> int:
    """A 63-bit digest of validated sequences and call options, to compare across ranks."""
    h = hashlib.blake2b(repr(extra).encode(), digest_size=8)
    for prompt, completion in seqs:
        h.update(array("q", (len(prompt), len(completion))).tobytes())
        h.update(array("q", prompt).tobytes())
        h.update(array("q", completion).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1
