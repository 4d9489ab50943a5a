"""The scheduler as a state machine: random add / schedule / complete / abort / flush /
drain on small pools (page sizes 1, 2, 16), checked after every step.

The test plays the engine. Each batch "runs": it writes (token, weight version) into a
shadow K/V pool at its slot_mapping, after checking that every position its chunks
attend to already holds that request's token, from the current weights unless the request
started before the last flush. So a prefix match of the wrong pages, a page written by
two requests, or a cached page surviving a flush shows up as wrong shadow K/V.
"""
from __future__ import annotations

from dataclasses import dataclass

import hypothesis.strategies as st
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
    version: int | None = None  # weight version when admitted


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 16]), pool=st.integers(2, 6),
                max_batch_tokens=st.integers(1, 40), max_batch_requests=st.integers(1, 5),
                enable_prefix_cache=st.booleans(),
                prefixes=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
                                  min_size=1, max_size=3))
    def setup(self, page_size, pool, max_batch_tokens, max_batch_requests,
              enable_prefix_cache, prefixes):
        self.page_size = page_size
        self.num_pages = pool * {1: 8, 2: 4, 16: 1}[page_size]
        self.max_batch_tokens, self.max_batch_requests = max_batch_tokens, max_batch_requests
        self.s = scheduler_module().Scheduler(self.num_pages, page_size, max_batch_tokens,
                                              max_batch_requests, enable_prefix_cache)
        self.prefixes = prefixes
        self.kv = [None] * (self.num_pages * page_size)  # (token, version) per slot
        self.version = 0
        self.shadows: dict[int, Shadow] = {}
        self.arrivals: list[int] = []  # waiting ids, in arrival order
        self.outstanding = []

    # -- rules -------------------------------------------------------------------------

    @rule(rid=st.integers(0, MAX_ID), prefix=st.integers(-1, 2),
          tail=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
          start=st.one_of(st.just(-1), st.integers(0, 200)))
    def add(self, rid, prefix, tail, start):
        tokens = (self.prefixes[prefix % len(self.prefixes)] if prefix >= 0 else []) + tail
        start = len(tokens) - 1 if start < 0 else start % len(tokens)
        fits = -(-len(tokens) // self.page_size) <= self.num_pages
        before = self.s.stats()
        try:
            self.s.add(rid, tokens, start)
        except ValueError as err:
            assert rid in self.shadows or not fits, err
            assert str(rid) in str(err) and self.s.stats() == before
            return
        assert rid not in self.shadows and fits
        self.shadows[rid] = Shadow(tokens, start, start)
        self.arrivals.append(rid)

    @rule()
    def schedule(self):
        b = self.s.schedule()
        if b is None:
            # With nothing in flight every waiting request fits an idle pool: None then
            # means no work, never a stall.
            assert self.outstanding or not self.s.has_work()
            return
        self.check_batch(b)
        self.outstanding.append(b)

    @precondition(lambda self: self.outstanding)
    @rule(index=st.integers(0, 3))
    def complete(self, index):
        self.complete_batch(self.outstanding.pop(index % len(self.outstanding)))

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
                self.complete_batch(self.outstanding.pop(0))
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

    def complete_batch(self, b):
        for rid in self.s.complete(b):
            sh = self.shadows.pop(rid)
            assert sh.next_scored == max(sh.start, len(sh.tokens) - 1), "scored positions lost"

    def check_batch(self, b):
        ps = self.page_size
        assert 0 < b.num_requests <= self.max_batch_requests
        assert b.num_tokens <= self.max_batch_tokens
        input_ids, positions = b.input_ids.tolist(), b.positions.tolist()
        slots, page_table = b.slot_mapping.tolist(), b.page_table.tolist()
        cu, kv_lens = b.cu_seqlens_q.tolist(), b.kv_lens.tolist()
        rows, targets = b.score_rows.tolist(), b.score_targets.tolist()
        refcounts = self.s.refcounts()
        assert cu[0] == 0 and len(cu) == b.num_requests + 1 and cu[-1] == b.num_tokens
        k = 0
        for i, e in enumerate(b.entries):
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
                sh.version = self.version
            row_pages = page_table[i * b.max_pages:(i + 1) * b.max_pages]
            n_pages = -(-e.end // ps)
            assert row_pages == e.pages[:n_pages] + [0] * (b.max_pages - n_pages)
            for pos in range(e.begin):  # what attention reads: this request's own K/V
                token, version = self.kv[e.pages[pos // ps] * ps + pos % ps]
                assert token == sh.tokens[pos], "attends to another request's K/V"
                assert sh.version != self.version or version == self.version, "stale K/V"
            for pos in range(e.begin, e.end):
                row = cu[i] + pos - e.begin
                assert positions[row] == pos and input_ids[row] == sh.tokens[pos]
                slot = slots[row]
                assert slot == e.pages[pos // ps] * ps + pos % ps
                assert refcounts[slot // ps] == 1 and self.s.cached_tokens(slot // ps) is None
                self.kv[slot] = (sh.tokens[pos], self.version)
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
                assert cached == [t for t, _ in self.kv[page * self.page_size:
                                                       (page + 1) * self.page_size]]
                assert all(v == self.version for _, v in
                           self.kv[page * self.page_size:(page + 1) * self.page_size])

    def teardown(self):
        if hasattr(self, "s"):
            self.drain()


SchedulerMachine.TestCase.settings = settings(
    max_examples=1000, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestScheduler = SchedulerMachine.TestCase
