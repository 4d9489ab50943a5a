"""Scoring sessions: sequences added in parts, scored in shared batches, each part finished
on its own.

A session fixes a call's options (temperature, entropy, rich options, routing capture,
tensor outputs) and takes parts. ``add(sequences)`` validates one part as
``compute_log_probs`` validates its call (nothing of a rejected part reaches the
scheduler) and gives it its own output buffers, rich options and request ids in the
shard's scheduler. ``step()`` runs one scheduler batch, whose rows may come from several
parts, sends each scored row to its part and returns the parts that finished: every
request completed and every score in the part's buffers. ``Part.result()`` then packages
it exactly as ``compute_log_probs`` packages a call, and ``compute_log_probs`` is a
session with one part stepped until it is done. A server keeps a session open while
requests with its options arrive: a request joins the running batches instead of
waiting for them to drain, and is answered once its own sequences are scored.

Scores stay on the device until a copy-out, started without waiting when the rows held
pass MAX_PENDING_ROWS, when a part's last batch ran, or when nothing is left to run. A
copy-out is stored into its parts (``LocalShard._copy_scores``, the loop's one wait for
the device) once the device reports it done, or when nothing else is left to run, so a
part finishing mid-session does not hold the next batch back.

Faults: an error or interrupt inside a step aborts every request of the session, retires
the batch in flight and flushes the prefix cache (its batches may have left pages
unwritten); the session is then closed and its unfinished parts never finish.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .interrupts import deferred_interrupts
from .padded import check_pad_to, flat_index, pad_flat, padding_mask, to_device
from .parallel.group import sequences_fingerprint
from .rich import RichCall, row_options
from .routing import CallRouting, routing_digest
from .runner import BatchScores


def _pad_routing(rows: list[Tensor], shape: tuple[int, int], device: torch.device) -> Tensor:
    """[N, max positions, L, k] int32 on ``device`` (where the rows are), -1 past each
    sequence's own positions."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width, *shape), -1, dtype=torch.int32, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _slots(firsts: list[int], counts: list[int]) -> Tensor:
    """[sum(counts)] int64 host: counts[j] consecutive slots from firsts[j], for each j."""
    count = torch.tensor(counts, dtype=torch.int64)
    # row i of run j goes to firsts[j] + (i - rows before run j)
    shift = torch.tensor(firsts, dtype=torch.int64) - (count.cumsum(0) - count)
    return torch.arange(int(count.sum())) + shift.repeat_interleave(count)


class Part:
    """The sequences of one ``add``: their flat output buffers (on the engine's device with
    tensor outputs, else on the host), rich options and requests. ``done`` once every
    score reached the buffers; ``result()`` is then its compute_log_probs dict."""

    def __init__(self, session: ScoringSession, seqs: list[tuple[list[int], list[int]]],
                 rich: RichCall | None, width: int, weight_version: int):
        self.seqs, self.rich, self.width = seqs, rich, width
        self.return_tensors, self.where = session.return_tensors, session.where
        self.weight_version = weight_version
        self.lengths = [len(c) for _, c in seqs]
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n)
        self.flat_lp = torch.empty(self.offsets[-1], dtype=torch.float32, device=self.where)
        self.flat_ent = (torch.empty_like(self.flat_lp) if session.return_entropy else None)
        self.rid_of: dict[int, int] = {}  # sequence index -> request id
        self.open: set[int] = set()       # request ids not completed yet
        self.dropped: set[int] = set()    # sequences whose remaining work was dropped
        self.held = False                 # rows in the session's pending batches
        self.copies = 0                   # copy-outs holding its rows, not stored yet
        self.routed: list[Tensor] | None = None  # per sequence [len - 1, L, k] int32
        self.routing_shape = session.routing_shape
        self.cancelled = False
        self.done = False

    def store(self, lp: Tensor, ent: Tensor | None, src: Tensor | None, dst: Tensor,
              extras: dict[str, Tensor], extras_src: Tensor | None) -> None:
        """Write scored rows to their slots ``dst`` (int64 host): rows ``src`` (host; None:
        all of them, in order) of ``lp``/``ent`` and rows ``extras_src`` of the rich
        outputs (host)."""
        device = self.flat_lp.device
        dst_here = to_device(dst, device)
        if src is not None:
            src_here = to_device(src, lp.device)
            lp = lp.index_select(0, src_here)
            ent = None if ent is None else ent.index_select(0, src_here)
        self.flat_lp.index_copy_(0, dst_here, lp.to(device))
        if self.flat_ent is not None:
            self.flat_ent.index_copy_(0, dst_here, ent.to(device))
        if self.rich is not None:
            self.rich.store(dst, {name: t.index_select(0, extras_src)
                                  for name, t in extras.items()})

    def result(self) -> dict[str, Any]:
        """compute_log_probs's dict for this part: lists per sequence, or with tensor
        outputs [N, width] tensors on the engine's device. Reads only the part's own
        buffers, so any thread may package a finished part while the session runs on."""
        assert self.done, "the part has not finished"
        for i in sorted(self.dropped):
            # a dropped sequence's rows are partly scored, partly never written
            self.flat_lp[self.offsets[i]:self.offsets[i + 1]] = float("nan")
            if self.flat_ent is not None:
                self.flat_ent[self.offsets[i]:self.offsets[i + 1]] = float("nan")
        out = self._package()
        if self.rich is not None:
            self.rich.package(out, self.lengths, self.return_tensors, self.width, self.where)
        if self.routed is not None:
            out["routed_experts"] = (
                _pad_routing(self.routed, self.routing_shape, self.where)
                if self.return_tensors else [r.tolist() for r in self.routed])
        out["weight_version"] = self.weight_version
        return out

    def _package(self) -> dict[str, Any]:
        lengths = self.lengths
        if not self.return_tensors:
            out = {"log_probs": [r.tolist() for r in self.flat_lp.split(lengths)],
                   "tokens": [c for _, c in self.seqs]}
            if self.flat_ent is not None:
                out["entropy"] = [r.tolist() for r in self.flat_ent.split(lengths)]
            return out
        device = self.where
        mask = padding_mask(lengths, self.width)
        index = to_device(flat_index(mask), device)
        tokens = torch.tensor([t for _, c in self.seqs for t in c], dtype=torch.int64)
        out = {"log_probs": pad_flat(self.flat_lp, index, mask.shape),
               "tokens": pad_flat(to_device(tokens, device), index, mask.shape),
               "mask": to_device(mask, device)}
        if self.flat_ent is not None:
            out["entropy"] = pad_flat(self.flat_ent, index, mask.shape)
        return out


@dataclass(eq=False)
class _Segment:
    """A batch's scored rows of one part, in the order the runner returns them."""
    part: Part
    dst: Tensor  # [n] int64 host: the rows' slots in the part's flat outputs


class ScoreCopy:
    """Scores of some batches on their way out of the device. Made without waiting: the
    rows of all the batches are concatenated where they are and, for host outputs on a
    GPU, copied to pinned host memory behind an event. ``store()`` waits for that event
    and writes each part's rows to its buffers."""

    def __init__(self, pending: list[tuple[BatchScores, list[_Segment]]], where: torch.device):
        # per part: its rows among all rows, its slots, its rows among the rich batches'
        self.rows: dict[Part, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        row = rich_row = 0
        for scores, segments in pending:
            for seg in segments:
                n = len(seg.dst)
                src, dst, rich_src = self.rows.setdefault(seg.part, ([], [], []))
                src.append(torch.arange(row, row + n))
                dst.append(seg.dst)
                row += n
                if scores.extras:
                    rich_src.append(torch.arange(rich_row, rich_row + n))
                    rich_row += n
        self.count = row
        self.entropy = pending[0][0].entropy is not None
        values = torch.cat([s.log_probs for s, _ in pending]
                           + [s.entropy for s, _ in pending if s.entropy is not None])
        extras = _rich_outputs([s for s, _ in pending if s.extras])
        self.event = None
        if values.device.type == "cuda":
            device = values.device
            if where.type == "cpu":
                values = _to_pinned(values)
            extras = {name: _to_pinned(t) for name, t in extras.items()}
            if where.type == "cpu" or extras:
                self.event = torch.cuda.Event()
                self.event.record(torch.cuda.current_stream(device))
        self.values, self.extras = values, extras

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def store(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        n = self.count
        lp = self.values[:n]
        ent = self.values[n:] if self.entropy else None
        whole = len(self.rows) == 1  # one part's rows, all of them in order
        for part, (src, dst, rich_src) in self.rows.items():
            part.store(lp, ent, None if whole else torch.cat(src), torch.cat(dst),
                       self.extras, torch.cat(rich_src) if rich_src else None)


def _to_pinned(t: Tensor) -> Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _rich_outputs(scores: list[BatchScores]) -> dict[str, Tensor]:
    """The rich outputs of batches that had some, concatenated. Requested-id log-probs
    are as wide as the widest part of their batch asks, so narrower batches (and batches
    whose parts asked for none) are padded with NaN to the widest."""
    names = {name for s in scores for name in s.extras}
    width = max((s.extras["token_logprobs"].shape[1] for s in scores
                 if "token_logprobs" in s.extras), default=0)
    out = {}
    for name in sorted(names):
        parts = []
        for s in scores:
            t = s.extras.get(name)
            if name == "token_logprobs":
                t = (s.log_probs.new_full((len(s.log_probs), width), float("nan")) if t is None
                     else torch.nn.functional.pad(t, (0, width - t.shape[1]),
                                                  value=float("nan")))
            parts.append(t)
        out[name] = torch.cat(parts)
    return out


class ScoringSession:
    """Parts scored together under one set of call options (module docstring). Made by
    ``LocalShard.session``; one is open on a shard at a time. Options are checked by
    ``add``, with each part's sequences, as compute_log_probs checks them."""

    def __init__(self, shard: Any, temperature: Any, *, return_entropy: bool,
                 return_tensors: bool, return_routed_experts: bool,
                 rich_options: dict[str, Any], max_rows: int):
        self._shard = shard
        self._temperature = temperature
        self._options = rich_options
        self.return_entropy, self.return_tensors = return_entropy, return_tensors
        self.capture = return_routed_experts
        # tensors are returned on the engine's device: the scores never visit the host
        self.where = shard.config.device if return_tensors else torch.device("cpu")
        table = shard.routing
        self.routing_shape = None if table is None else table.shape
        self._routing = None if table is None else CallRouting(table, return_routed_experts)
        self._plain_rows = self._max_rows = max_rows
        self._requests: dict[int, tuple[Part, int, int]] = {}  # id -> (part, first slot, start)
        self._pending: list[tuple[BatchScores, list[_Segment]]] = []
        self._rows = 0
        self._copies: deque[ScoreCopy] = deque()
        self._finishing: dict[Part, None] = {}  # requests all completed, not yet settled
        self._settled: list[Part] = []          # finished, not yet returned by step()
        self._batch = None  # scheduled and not yet completed
        self.closed = False

    @property
    def has_requests(self) -> bool:
        """Some part has requests in the scheduler."""
        return bool(self._requests)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the scoring session is closed")

    def add(self, sequences: Any, pad_to: int | None = None) -> Part:
        """Validate ``sequences`` (raising what compute_log_probs would, with nothing
        added) and queue them as one part behind every request already queued."""
        self._check_open()
        shard = self._shard
        seqs, temperature, rich, routes = shard.tp.validated(
            lambda: shard._validate_rich(sequences, self._temperature, self._options,
                                         self.capture),
            lambda v: sequences_fingerprint(v[0], v[1], self.return_entropy, self.capture,
                                            v[2] and v[2].fingerprint(),
                                            routing_digest(v[3])))
        width = check_pad_to(pad_to, self.return_tensors, [len(c) for _, c in seqs])
        self._temperature = temperature
        if rich is not None:
            self._max_rows = min(self._max_rows, rich.pending_rows(self._plain_rows))
        part = Part(self, seqs, rich, width, shard.weight_version)
        if shard.routing is not None:
            shard.routing.prepare(self.capture, shard.scheduler)
        added: list[int] = []
        # a Ctrl-C between a request's add and its record here would leak it
        with deferred_interrupts():
            try:
                for i, (prompt, completion) in enumerate(seqs):
                    # a capture reports the prompt's routing even with nothing to score
                    if not (completion or (self.capture and len(prompt) > 1)):
                        continue
                    rid = shard._next_request_id
                    shard._next_request_id += 1
                    start = len(prompt) - 1
                    tokens = prompt + completion
                    route_ids = None
                    if self._routing is not None:
                        route_ids = shard.routing.route_ids(routes[i], len(tokens))
                    shard.scheduler.add(rid, tokens, start, route_ids)
                    added.append(rid)
                    self._requests[rid] = (part, part.offsets[i], start)
                    part.rid_of[i] = rid
                    part.open.add(rid)
                    if self._routing is not None:
                        self._routing.add(rid, len(tokens), routes[i])
            except BaseException:
                for rid in added:
                    shard.scheduler.abort(rid)
                    self._requests.pop(rid, None)
                if self._routing is not None:
                    self._routing.forget(added)
                raise
        if not part.open:
            self._finishing[part] = None
            self._settle_ready()
        return part

    def drop(self, part: Part, sequences: Iterable[int]) -> None:
        """Drop the remaining work of some of a part's sequences (indices): their requests
        are aborted (pages back to the pool; full ones they wrote stay cached) and their
        scores come back NaN. Every batch so far was completed, so no page they own is
        still being written."""
        self._check_open()
        if self._shard.tp.size > 1:
            # ranks would drop at different batches and leave lockstep
            raise ValueError("dropping sequences needs tp_size 1")
        with deferred_interrupts():
            for i in sequences:
                if i in part.dropped:
                    continue
                part.dropped.add(i)
                if part.done:  # settled and counted as scored; now it comes back NaN
                    self._shard.scored_tokens -= part.lengths[i]
                rid = part.rid_of.get(i)
                if rid in part.open:
                    self._abort(rid)
            if not part.open and not part.done and not part.cancelled:
                self._finishing[part] = None

    def cancel(self, part: Part) -> None:
        """Drop a whole part (its caller went away): its requests are aborted and it never
        finishes."""
        self._check_open()
        if self._shard.tp.size > 1:
            raise ValueError("cancelling a part needs tp_size 1")
        with deferred_interrupts():
            for rid in list(part.open):
                self._abort(rid)
        part.cancelled = True
        self._finishing.pop(part, None)
        if self._routing is not None:
            self._routing.forget(part.rid_of.values())

    def _abort(self, rid: int) -> None:
        """Callers hold Ctrl-C: the scheduler and the records change together."""
        self._shard.scheduler.abort(rid)
        part, _, _ = self._requests.pop(rid)
        part.open.discard(rid)

    def step(self) -> list[Part]:
        """Run one batch (when any request is left), move scores out of the device as
        the module docstring says, and return the parts that finished since the last
        step, in the order they finished."""
        self._check_open()
        try:
            if self._requests:
                self._run_batch()
            self._copy_out()
        except BaseException:
            self._fail()
            raise
        settled, self._settled = self._settled, []
        return settled

    def _run_batch(self) -> None:
        """One batch, completed as soon as its forward is enqueued: the device runs batches
        in stream order, so its K/V is written before any later batch reads it, which is
        all the scheduler's page reuse and in-flight prefix sharing need. The scheduler and
        the session's records of it change together, a Ctrl-C held meanwhile (the records
        are what a failure aborts and retires)."""
        shard = self._shard
        with deferred_interrupts():
            batch = self._batch = shard.scheduler.schedule()
        if batch is None:
            raise RuntimeError("internal error: the scheduler has unfinished requests but "
                               "made no batch; the call was aborted")
        routing = None if self._routing is None else self._routing.metadata(batch)
        segments = self._segments(batch)
        scores = shard.runner.run(
            batch, self._temperature, self.return_entropy,
            row_options([(s.part.rich, s.dst) for s in segments], shard.config.device),
            routing)
        if self._routing is not None and self.capture:
            self._routing.after_batch(batch)
        rows = sum(len(s.dst) for s in segments)
        if rows != scores.log_probs.shape[0]:
            raise RuntimeError(f"internal error: a batch scored "
                               f"{tuple(scores.log_probs.shape)} rows for {rows} "
                               f"destinations")
        with deferred_interrupts():
            finished = shard.scheduler.complete(batch)
            self._batch = None
            for rid in finished:
                part, _, _ = self._requests.pop(rid)
                part.open.discard(rid)
                if not part.open:
                    self._finishing[part] = None
        if rows:
            self._pending.append((scores, segments))
            self._rows += rows
            for s in segments:
                s.part.held = True

    def _segments(self, batch) -> list[_Segment]:
        """The batch's scored rows, in runs of consecutive entries of one part."""
        runs: list[tuple[Part, list[int], list[int]]] = []
        for e in batch.entries:
            n = e.score_end - e.score_begin
            if n > 0:
                part, first, start = self._requests[e.request_id]
                if not runs or runs[-1][0] is not part:
                    runs.append((part, [], []))
                runs[-1][1].append(first + e.begin + e.score_begin - start)
                runs[-1][2].append(n)
        return [_Segment(part, _slots(firsts, counts)) for part, firsts, counts in runs]

    def _copy_out(self) -> None:
        finishing_held = any(p.held for p in self._finishing)
        if self._pending and (self._rows >= self._max_rows or finishing_held
                              or not self._requests):
            copy = ScoreCopy(self._pending, self.where)
            for part in copy.rows:
                part.held = False
                part.copies += 1
            self._copies.append(copy)
            self._pending, self._rows = [], 0
        # oldest first; waited for only when nothing is left to run
        while self._copies and (not self._requests or self._copies[0].ready()):
            copy = self._copies.popleft()
            self._shard._copy_scores(copy)
            for part in copy.rows:
                part.copies -= 1
        self._settle_ready()

    def _settle_ready(self) -> None:
        for part in [p for p in self._finishing if not p.held and not p.copies]:
            del self._finishing[part]
            if self._routing is not None:
                rids = [part.rid_of.get(i) for i in range(len(part.seqs))]
                if self.capture:
                    part.routed = self._routing.result(
                        rids, [len(p) + len(c) for p, c in part.seqs], self.where)
                self._routing.forget(part.rid_of.values())
            self._shard.scored_tokens += part.offsets[-1] - sum(part.lengths[i]
                                                                for i in part.dropped)
            part.done = True
            self._settled.append(part)

    def _fail(self) -> None:
        """A step failed with batches in flight: the batch being run (if not completed) may
        have written only some of its K/V, and so may an earlier batch whose error the
        device reports late. Abort every request, retire the batch (else later requests
        wait on its pages forever), flush the prefix cache (which may hold pages those
        batches left unwritten) and close the session."""
        scheduler = self._shard.scheduler
        with deferred_interrupts():
            for rid in self._requests:
                scheduler.abort(rid)
            self._requests.clear()
            if self._batch is not None:
                scheduler.complete(self._batch)
                self._batch = None
            scheduler.flush()
            self._close()

    def close(self) -> None:
        """Abort whatever is left (requests of unfinished parts); closing again does
        nothing."""
        if self.closed:
            return
        with deferred_interrupts():
            for rid in list(self._requests):
                self._abort(rid)
            self._close()

    def _close(self) -> None:
        self._pending, self._copies, self._finishing = [], deque(), {}
        self.closed = True

    def __enter__(self) -> ScoringSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(eq=False)
class MergedPart:
    """A part of a MergedSession: its sequences, and its slice of a merged call's result."""
    sequences: Any
    output: dict[str, Any] | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.output is not None

    def result(self) -> dict[str, Any]:
        assert self.output is not None, "the part has not finished"
        return self.output


class MergedSession:
    """The session interface over a backend whose scheduler lives elsewhere (tensor-parallel
    worker processes): each step scores every part added since the previous step in one
    compute_log_probs call, so parts join between calls rather than between batches, and
    a cancelled part is dropped only while it waits for its call. Lists only (each part
    gets its sequences' entries of the merged call's per-sequence lists)."""

    def __init__(self, call: Callable[..., Any], temperature: Any, *, return_entropy: bool,
                 return_tensors: bool, return_routed_experts: bool,
                 rich_options: dict[str, Any]):
        if return_tensors:
            raise ValueError("a session over tensor-parallel workers returns lists; score "
                             "with compute_log_probs(return_tensors=True) instead")
        self._call, self._temperature = call, temperature
        self._rich_options = rich_options
        self._options = dict(rich_options, return_entropy=return_entropy,
                             return_routed_experts=return_routed_experts)
        self._parts: list[MergedPart] = []
        self.closed = False

    def add(self, sequences: Any, pad_to: int | None = None) -> MergedPart:
        if self.closed:
            raise RuntimeError("the scoring session is closed")
        check_pad_to(pad_to, False, [])
        self._call("validate", sequences, self._temperature, **self._rich_options)
        part = MergedPart(sequences)
        self._parts.append(part)
        return part

    def step(self) -> list[MergedPart]:
        if self.closed:
            raise RuntimeError("the scoring session is closed")
        parts = [p for p in self._parts if not p.cancelled]
        self._parts = []
        if not parts:
            return []
        sequences = [s for p in parts for s in p.sequences]
        out = self._call("compute_log_probs", sequences, self._temperature, **self._options)
        start = 0
        for p in parts:
            n = len(p.sequences)
            # per-sequence outputs are lists with one entry per sequence; the rest
            # (weight_version) apply to every part as they are
            p.output = {k: v[start:start + n] if isinstance(v, list) else v
                        for k, v in out.items()}
            if self._rich_options.get("token_ids") is None and not any(
                    isinstance(s, Mapping) and "token_ids" in s for s in p.sequences):
                # requested ids are the merged call's output; a part that asked none
                # returns what its own call would
                p.output.pop("token_ids_logprobs", None)
            start += n
        return parts

    def cancel(self, part: MergedPart) -> None:
        part.cancelled = True

    def close(self) -> None:
        self._parts = []
        self.closed = True

    def __enter__(self) -> MergedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
