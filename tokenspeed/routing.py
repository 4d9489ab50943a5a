"""Routing capture and replay for MoE models (docs/design.md, "MoE routing").

Capture: once a call asks for ``return_routed_experts``, the shard keeps a per-slot
buffer [num_slots, L, k] int16 beside the K/V pool (L sparse layers, k experts each) and
every later forward writes the experts of each computed token into its slot. A request's
routing is gathered by slot at its last chunk, while it still owns its pages, so
positions served from the prefix cache report the routing of the forward that computed
them. The prefix cache is flushed when the buffer is allocated: no cached page lacks
its routing.

Replay: a sequence's ``routed_experts`` [len - 1, L, k] forces those experts. The prefix
cache must then share K/V only between requests whose shared tokens were routed
identically: each distinct per-position routing is interned to an id >= 1 (a dict on
its bytes, so equal ids mean equal routing, compared in full), free positions get id 0,
and the scheduler's radix cache compares these ids along with the tokens (route keys).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .inputs import InvalidSequenceError
from .layers.moe import RoutingMetadata
from .models.moe_config import MoEConfig

FIELD = "routed_experts"
# bytes of interned routings kept before the table (and with it the prefix cache) is
# reset: a routing is L * k int16, 768 bytes at 48 layers x top-8
MAX_INTERNED_BYTES = 256 << 20


def check_routed_experts(index: int, item: Mapping[str, Any], length: int,
                         moe: MoEConfig | None) -> Tensor | None:
    """A sequence's forced routing as int32 [length - 1, L, k] (None if it has none), or
    an InvalidSequenceError naming the sequence."""
    value = item.get(FIELD)
    if value is None:
        return None
    if moe is None:
        raise InvalidSequenceError(index, FIELD, f"{FIELD} given, but the model has no "
                                                 f"mixture-of-experts layers")
    shape = (length - 1, len(moe.sparse_layers), moe.top_k)
    try:
        routing = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidSequenceError(index, FIELD, f"{FIELD} is not an integer array: {e}") from None
    if routing.numel() == 0 and shape[0] == 0:
        return torch.empty(shape, dtype=torch.int32)
    if routing.dtype.is_floating_point or routing.dtype.is_complex or routing.dtype == torch.bool:
        raise InvalidSequenceError(index, FIELD, f"{FIELD} must hold integer expert ids, "
                                                 f"got {routing.dtype}")
    if tuple(routing.shape) != shape:
        raise InvalidSequenceError(index, FIELD, f"{FIELD} must have shape {list(shape)} "
                                                 f"(tokens - 1, MoE layers, top_k), got "
                                                 f"{list(routing.shape)}")
    bad = (routing < 0) | (routing >= moe.num_experts)
    if bad.any():
        p, layer, s = (int(x) for x in bad.nonzero()[0])
        raise InvalidSequenceError(index, FIELD, f"{FIELD}[{p}][{layer}][{s}] is "
                                                 f"{int(routing[p, layer, s])}, experts are "
                                                 f"[0, {moe.num_experts})")
    ordered = routing.sort(dim=-1).values
    dup = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
    if dup.any():
        p, layer = (int(x) for x in dup.nonzero()[0])
        raise InvalidSequenceError(index, FIELD, f"{FIELD}[{p}][{layer}] names an expert "
                                                 f"twice: {routing[p, layer].tolist()}")
    return routing.to(torch.int32)


def routing_digest(routes: list[Tensor | None]) -> str:
    """A digest of a call's forced routings, for the ranks' agreement on their input."""
    h = hashlib.blake2b(digest_size=8)
    for i, r in enumerate(routes):
        if r is not None:
            h.update(i.to_bytes(8, "little"))
            h.update(r.numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Request:
    length: int
    forced: Tensor | None  # [length - 1, L, k] int32 on the host


class RoutingTable:
    """One shard's routing state: the route-id interning and the per-slot buffer."""

    def __init__(self, moe: MoEConfig, num_slots: int, page_size: int, device: torch.device):
        self.shape = (len(moe.sparse_layers), moe.top_k)
        self.num_slots, self.page_size, self.device = num_slots, page_size, device
        self.interned: dict[bytes, int] = {}
        self.slots: Tensor | None = None  # [num_slots, L, k] int16, once capture is used

    def prepare(self, capture: bool, scheduler) -> None:
        """Before a call adds requests: allocate the slot buffer on the first capture (and
        flush the cache, whose pages have no routing recorded), and reset a full intern
        table (flushing the cache, whose keys refer to it)."""
        if capture and self.slots is None:
            self.slots = torch.zeros(self.num_slots, *self.shape, dtype=torch.int16,
                                     device=self.device)
            scheduler.flush()
        if len(self.interned) * self.shape[0] * self.shape[1] * 2 > MAX_INTERNED_BYTES:
            self.interned.clear()
            scheduler.flush()

    def route_ids(self, forced: Tensor | None, length: int) -> list[int] | None:
        """Per position of a request, the id of its forced routing (0: free; the last
        position is always free, no routing is given for it); None when all are free."""
        if forced is None:
            return None
        rows = forced.to(torch.int16).numpy()  # expert ids < 2048
        ids = [self.interned.setdefault(row.tobytes(), len(self.interned) + 1) for row in rows]
        return ids + [0] * (length - len(ids))


class CallRouting:
    """The routing work of one scoring session (a compute_log_probs call is one): forced
    rows per batch, the slot buffer's writes, and the gathered routing of each request
    when the session captures."""

    def __init__(self, table: RoutingTable, capture: bool):
        self.table, self.capture = table, capture
        self.requests: dict[int, _Request] = {}
        self.gathered: dict[int, Tensor] = {}  # request id -> [length - 1, L, k] on device

    def add(self, request_id: int, length: int, forced: Tensor | None) -> None:
        self.requests[request_id] = _Request(length, forced)

    def forget(self, request_ids: Iterable[int]) -> None:
        """Requests that finished (their routing reported) or were dropped."""
        for rid in request_ids:
            self.requests.pop(rid, None)
            self.gathered.pop(rid, None)

    def metadata(self, batch) -> RoutingMetadata | None:
        """The batch's forced rows (host-built, one copy) and capture buffer."""
        table = self.table
        forced = None
        if any(self.requests[e.request_id].forced is not None for e in batch.entries):
            parts = []
            for e in batch.entries:
                r = self.requests[e.request_id]
                rows = torch.full((e.end - e.begin, *table.shape), -1, dtype=torch.int32)
                if r.forced is not None:
                    given = r.forced[e.begin:min(e.end, r.length - 1)]
                    rows[:len(given)] = given
                parts.append(rows)
            forced = torch.cat(parts).to(table.device, non_blocking=True)
        captured = None
        if table.slots is not None:
            captured = torch.empty(batch.num_tokens, *table.shape, dtype=torch.int32,
                                   device=table.device)
        if forced is None and captured is None:
            return None
        return RoutingMetadata(forced=forced, captured=captured, slot_buffer=table.slots)

    def after_batch(self, batch) -> None:
        """Gather the routing of capturing requests whose last chunk this batch ran; the
        gather is queued after the batch's forward, so every slot it reads is written."""
        ps = self.table.page_size
        for e in batch.entries:
            r = self.requests.get(e.request_id)
            if r is None or e.end != r.length:
                continue
            pos = torch.arange(r.length - 1)
            pages = torch.tensor(e.pages, dtype=torch.int64)
            slots = (pages[pos // ps] * ps + pos % ps).to(self.table.device, non_blocking=True)
            self.gathered[e.request_id] = self.table.slots[slots]

    def result(self, request_ids: list[int | None], lengths: list[int], device: torch.device
               ) -> list[Tensor]:
        """Per sequence (its request id; None for one without a request), its routing
        [length - 1, L, k] int32 on ``device``, moved there in one copy (a copy per
        sequence waited for the device once per sequence)."""
        rows = [None if rid is None else self.gathered.get(rid) for rid in request_ids]
        # nothing gathered: a one-token prompt without a completion (no positions), or a
        # sequence dropped mid-call (its positions report no experts, -1)
        rows = [r if r is not None else
                self.table.slots.new_full((max(lengths[i] - 1, 0), *self.table.shape), -1)
                for i, r in enumerate(rows)]
        if not rows:
            return []
        flat = torch.cat(rows).to(device=device, dtype=torch.int32)
        return list(flat.split([len(r) for r in rows]))
