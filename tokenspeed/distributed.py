"""The tensor-parallel group: rank and size that the sharded layers read.

Only tp_size == 1 runs today; the layers already shard by these numbers so that
torch.distributed can slot in here without touching the model files.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1


_GROUP = TPGroup()


def tp_group() -> TPGroup:
    return _GROUP
