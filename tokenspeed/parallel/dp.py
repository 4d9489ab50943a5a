"""Data parallelism under torchrun: one engine per TP group, each scoring a slice."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist


def compute_log_probs_dp(engine: Any, sequences: Sequence[Any], temperature: float = 1.0, *,
                         return_entropy: bool = False) -> dict[str, list]:
    """Data parallelism under torchrun: one engine per TP group (world = dp x tp).

    Every rank passes the same full ``sequences``; DP rank k (= rank // tp_size) scores
    the k-th contiguous slice, and every rank returns the whole result, in input order,
    as lists. A call rejected on any rank raises on every rank.
    """
    if not dist.is_initialized():
        raise RuntimeError("compute_log_probs_dp needs an initialised process group "
                           "(launch with torchrun)")
    world, rank, tp = dist.get_world_size(), dist.get_rank(), engine.config.tp_size
    dp_size, dp_rank = world // tp, rank // tp
    n = len(sequences)
    lo, hi = n * dp_rank // dp_size, n * (dp_rank + 1) // dp_size
    try:
        reply: tuple[str, Any] = ("ok", engine.compute_log_probs(
            list(sequences[lo:hi]), temperature, return_entropy=return_entropy))
    except Exception as e:  # noqa: BLE001 - every rank must reach the gather below
        reply = ("err", e)
    replies: list[Any] = [None] * world
    dist.all_gather_object(replies, (reply[0], reply[1] if reply[0] == "ok" else repr(reply[1])))
    if reply[0] == "err":
        raise reply[1]
    failed = [r for r, (status, _) in enumerate(replies) if status == "err"]
    if failed:
        raise ValueError(f"ranks {failed} rejected their slice: {replies[failed[0]][1]}")
    firsts = [replies[k * tp][1] for k in range(dp_size)]
    # per-sequence lists are joined; per-call values (weight_version) are every group's
    return {key: [row for part in firsts for row in part[key]]
            if isinstance(value, list) else value for key, value in firsts[0].items()}
