"""The scheduler as a state machine: random add / schedule / complete / abort / flush /
drain on small pools (page sizes 1, 2, 16), checked after every step.

The test plays the engine with a shadow K/V pool. A batch runs as the model runs it:
every entry first stores its chunk (each slot gets the token prefix it ends, which is
what K/V depends on, the writer's weight version, and which batch and entry wrote it),
then every entry attends to [0, end). Each attended position must hold this request's
prefix, from the weights it was admitted under, written by a completed batch or by the
same or an earlier entry of this batch. No slot is written twice in a batch, and no
page is written while another request holds it, except by the writer a sibling placed
later in the same batch matched. So a prefix match of the wrong pages, of pages not
written yet, a page written under a reader, or K/V surviving a flush all show up.
"""
from __future__ import annotations

from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)
from test_scheduler import CACHED, FREE, OWNED, scheduler_module

MAX_ID = 12
VOCAB = 4  # few distinct tokens: prompts share prefixes and pages repeat


@dataclass
class Shadow:
    tokens: list[int]
    start: int
    next_scored: int
    keys: tuple = ()  # (token, route id) per position: what K/V at a position depends on
    version: int | None = None  # weight version when admitted
    admit_batch: int | None = None
    cached_len: int = 0
    pages: tuple[int, ...] = ()


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 16]), pool=st.integers(2, 6),
                max_batch_tokens=st.integers(1, 80), max_batch_requests=st.integers(1, 6),
                enable_prefix_cache=st.booleans(), route_keys=st.booleans(),
                prefixes=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
                                  min_size=1, max_size=3))
    def setup(self, page_size, pool, max_batch_tokens, max_batch_requests,
              enable_prefix_cache, route_keys, prefixes):
        self.page_size = page_size
        self.num_pages = pool * {1: 8, 2: 4, 16: 1}[page_size]
        self.max_batch_tokens, self.max_batch_requests = max_batch_tokens, max_batch_requests
        self.s = scheduler_module().Scheduler(self.num_pages, page_size, max_batch_tokens,
                                              max_batch_requests, enable_prefix_cache,
                                              route_keys=route_keys)
        self.route_keys = route_keys
        self.prefixes = prefixes
        # per slot: (token, prefix it ends, writer's weight version, batch, entry)
        self.kv = [None] * (self.num_pages * page_size)
        self.version = 0
        self.batches = 0  # sequence number of the next batch
        self.completed: set[int] = set()
        self.shadows: dict[int, Shadow] = {}
        self.arrivals: list[int] = []  # waiting ids, in arrival order
        self.outstanding = []

    # -- rules -------------------------------------------------------------------------

    @rule(rid=st.integers(0, MAX_ID), prefix=st.integers(-1, 2),
          tail=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
          start=st.one_of(st.just(-1), st.integers(0, 200)), route=st.integers(0, 2))
    def add(self, rid, prefix, tail, start, route):
        tokens = (self.prefixes[prefix % len(self.prefixes)] if prefix >= 0 else []) + tail
        self.add_request(rid, tokens, len(tokens) - 1 if start < 0 else start % len(tokens),
                         route)

    @rule(rid=st.integers(0, MAX_ID), prefix=st.integers(0, 2),
          tails=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20),
                         min_size=2, max_size=5), route=st.integers(0, 2))
    def add_siblings(self, rid, prefix, tails, route):
        """A GRPO group: completions of one prompt, added together."""
        prompt = self.prefixes[prefix % len(self.prefixes)]
        for i, tail in enumerate(tails):
            self.add_request((rid + i) % (MAX_ID + 1), prompt + tail, len(prompt) - 1, route)

    def add_request(self, rid, tokens, start, route=0):
        """route (with route_keys): 0 gives every position route id 0 (free), r > 0 gives
        every third position id 0 and the others r (a replayed routing)."""
        fits = -(-len(tokens) // self.page_size) <= self.num_pages
        before = self.s.stats()
        routes = [0 if not self.route_keys or pos % 3 == 0 else route
                  for pos in range(len(tokens))]
        try:
            self.s.add(rid, tokens, start, routes if self.route_keys and route else None)
        except ValueError as err:
            assert rid in self.shadows or not fits, err
            assert str(rid) in str(err) and self.s.stats() == before
            return
        assert rid not in self.shadows and fits
        self.shadows[rid] = Shadow(tokens, start, start, keys=tuple(zip(tokens, routes)))
        self.arrivals.append(rid)

    @rule()
    def schedule(self):
        b = self.s.schedule()
        if b is None:
            # With nothing in flight every waiting request fits an idle pool: None then
            # means no work, never a stall.
            assert self.outstanding or not self.s.has_work()
            return
        self.outstanding.append((self.check_batch(b), b))

    @precondition(lambda self: self.outstanding)
    @rule(index=st.integers(0, 3))
    def complete(self, index):
        self.complete_batch(*self.outstanding.pop(index % len(self.outstanding)))

    @rule(rid=st.integers(0, MAX_ID))
    def abort(self, rid):
        try:
            self.s.abort(rid)
        except ValueError:
            assert rid not in self.shadows
            return
        del self.shadows[rid]
        if rid in self.arrivals:
            self.arrivals.remove(rid)

    @rule()
    def flush(self):
        self.s.flush()
        self.version += 1
        assert self.s.stats()["cached_pages"] == 0

    @rule()
    def drain(self):
        """Everything admitted finishes and everything waiting gets admitted: no deadlock."""
        for _ in range(10_000):
            while self.outstanding:
                self.complete_batch(*self.outstanding.pop(0))
            if not self.s.has_work():
                break
            self.schedule()
            self.pages_consistent()
        else:
            raise AssertionError("drain does not terminate")
        st_ = self.s.stats()
        assert not self.shadows and st_["owned_pages"] == 0
        assert st_["free_pages"] + st_["cached_pages"] == st_["total_pages"]

    # -- checks ------------------------------------------------------------------------

    def complete_batch(self, seq, b):
        self.completed.add(seq)
        for rid in self.s.complete(b):
            sh = self.shadows.pop(rid)
            assert sh.next_scored == max(sh.start, len(sh.tokens) - 1), "scored positions lost"

    def check_batch(self, b):
        """Checks a new batch and runs it on the shadow pool; returns its sequence number."""
        ps = self.page_size
        seq = self.batches
        self.batches += 1
        assert 0 < b.num_requests <= self.max_batch_requests
        assert b.num_tokens <= self.max_batch_tokens
        input_ids, positions = b.input_ids.tolist(), b.positions.tolist()
        slots, page_table = b.slot_mapping.tolist(), b.page_table.tolist()
        cu, kv_lens = b.cu_seqlens_q.tolist(), b.kv_lens.tolist()
        rows, targets = b.score_rows.tolist(), b.score_targets.tolist()
        assert cu[0] == 0 and len(cu) == b.num_requests + 1 and cu[-1] == b.num_tokens
        entries = b.entries
        entry_of = {e.request_id: i for i, e in enumerate(entries)}
        assert len(entry_of) == len(entries)
        for i, e in enumerate(entries):
            sh = self.shadows[e.request_id]
            L = len(sh.tokens)
            assert 0 <= e.begin < e.end <= L and kv_lens[i] == e.end
            assert cu[i + 1] - cu[i] == e.end - e.begin
            assert e.cached_len % ps == 0 and e.cached_len <= sh.start // ps * ps
            assert len(e.pages) == -(-L // ps)
            if sh.version is None:  # admission: first come, first served
                assert e.begin == e.cached_len
                assert self.arrivals[0] == e.request_id, "admitted out of arrival order"
                self.arrivals.pop(0)
                sh.version, sh.admit_batch = self.version, seq
                sh.cached_len, sh.pages = e.cached_len, tuple(e.pages)
            assert tuple(e.pages) == sh.pages and e.cached_len == sh.cached_len
            row_pages = page_table[i * b.max_pages:(i + 1) * b.max_pages]
            n_pages = -(-e.end // ps)
            assert row_pages == e.pages[:n_pages] + [0] * (b.max_pages - n_pages)

        # Store: every entry's chunk, before any attention of this batch. A page may be
        # written only while no other request holds it, but for siblings that matched it
        # in this batch, placed after its writer.
        holders: dict[int, list[tuple[int, int]]] = {}
        for rid, sh in self.shadows.items():
            for k, page in enumerate(sh.pages):
                holders.setdefault(page, []).append((rid, k))
        for i, e in enumerate(entries):
            sh = self.shadows[e.request_id]
            for pos in range(e.begin, e.end):
                row = cu[i] + pos - e.begin
                assert positions[row] == pos and input_ids[row] == sh.tokens[pos]
                slot = slots[row]
                assert slot == e.pages[pos // ps] * ps + pos % ps
                for rid, k in holders.get(slot // ps, ()):
                    other = self.shadows[rid]
                    assert rid == e.request_id or (
                        k < other.cached_len // ps and other.admit_batch == seq
                        and entry_of.get(rid, -1) > i), "writes a page another request holds"
                old = self.kv[slot]
                assert old is None or old[3] != seq, "slot written twice in one batch"
                self.kv[slot] = (sh.tokens[pos], sh.keys[:pos + 1], sh.version, seq, i)

        # Attend: [0, end) of each entry through its page-table row.
        k = 0
        for i, e in enumerate(entries):
            sh = self.shadows[e.request_id]
            L = len(sh.tokens)
            for pos in range(e.end):
                token, prefix, version, wrote_in, by = self.kv[e.pages[pos // ps] * ps + pos % ps]
                assert prefix == sh.keys[:pos + 1], "attends to another prefix's (or routing's) K/V"
                assert version == sh.version, "attends to K/V of other weights"
                assert (by <= i) if wrote_in == seq else (wrote_in in self.completed), \
                    "attends to K/V a later entry or an uncompleted batch writes"
            lo = min(max(e.begin, sh.start), e.end)
            hi = max(min(e.end, L - 1), lo)
            assert (e.score_begin, e.score_end) == (lo - e.begin, hi - e.begin)
            for off in range(e.score_begin, e.score_end):  # each exactly once, in order
                pos = positions[rows[k]]
                assert rows[k] == cu[i] + off and pos == sh.next_scored
                assert targets[k] == sh.tokens[pos + 1]
                sh.next_scored += 1
                k += 1
        assert k == len(rows) == b.num_scored
        return seq

    @invariant()
    def pages_consistent(self):
        self.s.check_invariants()  # refcounts == holders, tree structure, no leak
        states, refcounts, st_ = self.s.page_states(), self.s.refcounts(), self.s.stats()
        assert st_["free_pages"] == states.count(FREE)
        assert st_["owned_pages"] == states.count(OWNED)
        assert st_["cached_pages"] == states.count(CACHED)
        assert len(states) == st_["total_pages"] == self.num_pages
        assert st_["waiting"] == len(self.arrivals)
        assert st_["waiting"] + st_["running"] == len(self.shadows)
        for page, (state, ref) in enumerate(zip(states, refcounts)):
            assert ref >= 0 and (ref > 0) == (state == OWNED)
            cached = self.s.cached_tokens(page)
            assert state != CACHED or cached is not None
            if cached is not None:  # cached pages hold the K/V of the tokens they claim
                kv = self.kv[page * self.page_size:(page + 1) * self.page_size]
                assert cached == [slot[0] for slot in kv]
                assert all(slot[2] == self.version for slot in kv)

    def teardown(self):
        if hasattr(self, "s"):
            self.drain()


SchedulerMachine.TestCase.settings = settings(
    max_examples=1000, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestScheduler = pytest.mark.slow(SchedulerMachine.TestCase)
