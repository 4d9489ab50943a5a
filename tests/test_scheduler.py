"""Targeted tests of the C++ scheduler: the known traps of scored windows, chunking and
the prefix cache, plus the Python API and its errors.

The state-machine test (test_scheduler_stateful.py) covers random interleavings; these
pin each trap with a case small enough to read.
"""
from __future__ import annotations

import array
import gc
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenspeed_ext

FREE, OWNED, CACHED = 0, 1, 2
ARRAYS = ("input_ids", "positions", "slot_mapping", "page_table", "cu_seqlens_q", "kv_lens",
          "score_rows", "score_targets")


def scheduler_module():
    """The scheduler's pybind11 module; ``tokenspeed_ext`` builds the op library only when
    an op is touched, so these tests never build the kernels."""
    return tokenspeed_ext.scheduler_module


def make(num_pages=64, page_size=4, max_batch_tokens=1024, **kw):
    return scheduler_module().Scheduler(num_pages, page_size, max_batch_tokens, **kw)


def score_rows_by_entry(batch):
    """Per entry: its (position, target) score pairs, checked against the flat arrays."""
    positions = batch.positions.tolist()
    rows, targets = batch.score_rows.tolist(), batch.score_targets.tolist()
    cu = batch.cu_seqlens_q.tolist()
    out, k = [], 0
    for i, e in enumerate(batch.entries):
        pairs = []
        for off in range(e.score_begin, e.score_end):
            assert rows[k] == cu[i] + off
            pairs.append((positions[rows[k]], targets[k]))
            k += 1
        out.append(pairs)
    assert k == len(rows) == batch.num_scored
    return out


def drain(s):
    """Run every request to the end. Returns ({id: [(position, target), ...]}, [entries of
    each batch]) with the score pairs in emission order."""
    scored, batches = defaultdict(list), []
    while (b := s.schedule()) is not None:
        for e, pairs in zip(b.entries, score_rows_by_entry(b)):
            scored[e.request_id] += pairs
        batches.append(b.entries)
        s.complete(b)
        s.check_invariants()
    assert not s.has_work()
    return scored, batches


def expected_scores(tokens, start):
    return [(p, tokens[p + 1]) for p in range(start, len(tokens) - 1)]


def tokens_of(seed, n):
    return torch.randint(0, 50_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_window_spans_several_chunks():
    tokens = tokens_of(0, 21)
    s = make(page_size=2, max_batch_tokens=4)
    s.add(7, tokens, 5)
    scored, batches = drain(s)
    assert scored[7] == expected_scores(tokens, 5)
    chunks = [(b[0].begin, b[0].end) for b in batches]
    assert chunks == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 21)]
    # [0, 4) lies before the window, [4, 8) enters it at offset 1, the last chunk holds
    # only position L - 1, which scores nothing.
    assert [(b[0].score_begin, b[0].score_end) for b in batches] == [
        (4, 4), (1, 4), (0, 4), (0, 4), (0, 4), (0, 0)]


def test_chunk_starting_after_window_start_scores_from_offset_zero():
    tokens = tokens_of(1, 12)
    s = make(page_size=4, max_batch_tokens=3)
    s.add(1, tokens, 2)
    b1 = s.schedule()
    assert (b1.entries[0].begin, b1.entries[0].score_begin, b1.entries[0].score_end) == (0, 2, 3)
    s.complete(b1)
    b2 = s.schedule()
    e = b2.entries[0]
    assert (e.begin, e.end, e.score_begin, e.score_end) == (3, 6, 0, 3)
    assert score_rows_by_entry(b2) == [expected_scores(tokens, 2)[1:4]]


def test_batch_mixing_windows_scores_each_request_alone():
    requests = {  # id: (tokens, logprob_start)
        1: (tokens_of(2, 9), 0),   # every position but the last
        2: (tokens_of(3, 14), 6),  # a completion after a prompt
        3: (tokens_of(4, 5), 4),   # empty window: start == L - 1
        4: (tokens_of(5, 7), 5),   # exactly one scored position
    }
    s = make(page_size=2, max_batch_tokens=64)
    for rid, (tokens, start) in requests.items():
        s.add(rid, tokens, start)
    b = s.schedule()
    assert [e.request_id for e in b.entries] == [1, 2, 3, 4]
    empty = b.entries[2]
    assert empty.score_begin == empty.score_end
    for e, pairs in zip(b.entries, score_rows_by_entry(b)):
        tokens, start = requests[e.request_id]
        assert pairs == expected_scores(tokens, start)
        alone = make(page_size=2, max_batch_tokens=64)
        alone.add(e.request_id, tokens, start)
        assert score_rows_by_entry(alone.schedule()) == [pairs]
    assert s.complete(b) == [1, 2, 3, 4]


@pytest.mark.parametrize("prompt_len", [12, 9, 13])
def test_prefix_hit_never_skips_the_last_prompt_token(prompt_len):
    page = 4
    prompt = tokens_of(6, prompt_len)
    first = prompt + tokens_of(7, 6)
    s = make(page_size=page)
    s.add(0, first, prompt_len - 1)
    drain(s)
    assert s.stats()["cached_pages"] == len(first) // page
    # Same prompt, other completion; and the very same sequence, whose every full page
    # is cached: both may reuse only pages wholly before logprob_start.
    for rid, tokens in ((1, prompt + tokens_of(8, 5)), (2, first)):
        start = prompt_len - 1
        s.add(rid, tokens, start)
        b = s.schedule()
        e = b.entries[0]
        assert e.cached_len == start // page * page
        assert e.begin == e.cached_len <= start < e.end
        assert b.positions.tolist()[0] == e.begin
        assert score_rows_by_entry(b) == [expected_scores(tokens, start)]
        s.complete(b)
        s.check_invariants()


def test_flush_while_running():
    page = 2
    shared = tokens_of(9, 8)
    s = make(num_pages=16, page_size=page, max_batch_tokens=4)
    s.add(0, shared, 7)
    drain(s)
    cached_before = s.stats()["cached_pages"]
    assert cached_before == 4
    s.add(1, shared + tokens_of(10, 6), 9)      # matches the cached pages, then runs
    b = s.schedule()
    assert b.entries[0].cached_len == 8
    s.add(2, tokens_of(11, 10), 3)              # admitted while request 1 is in flight
    b2 = s.schedule()
    assert [e.request_id for e in b2.entries] == [2]
    s.complete(b)
    s.complete(b2)
    inserted = s.stats()["inserted_pages"]

    s.flush()
    st = s.stats()
    assert st["cached_pages"] == 0 and st["free_pages"] + st["owned_pages"] == st["total_pages"]
    states = s.page_states()
    assert all(s.cached_tokens(p) is None for p in range(len(states)))
    # Request 1 still holds the pages it matched; they are owned now, no longer cached.
    assert [states[p] for p in b.entries[0].pages[:4]] == [OWNED] * 4
    s.check_invariants()

    assert s.stats()["running"] == 2
    drain(s)
    st = s.stats()
    assert st["inserted_pages"] == inserted  # requests running across the flush are not cached
    assert st["cached_pages"] == 0 and st["free_pages"] == st["total_pages"]
    s.add(3, shared + tokens_of(10, 6), 9)
    assert s.schedule().entries[0].cached_len == 0


def test_sibling_in_the_same_batch_as_its_writer():
    """Request 0 computes the prompt's pages in this batch; request 1, placed after it,
    reads them in the same forward (all K/V is stored before any attention)."""
    tokens = tokens_of(12, 10)
    s = make(num_pages=12, page_size=2)
    s.add(0, tokens, 9)
    s.add(1, tokens, 9)
    b = s.schedule()
    e0, e1 = b.entries
    assert [e.cached_len for e in b.entries] == [0, 8]
    assert e1.pages[:4] == e0.pages[:4] and e1.pages[4] != e0.pages[4]
    assert (e1.begin, e1.end) == (8, 10)
    assert b.slot_mapping.tolist()[10:] == [e1.pages[4] * 2, e1.pages[4] * 2 + 1]
    assert score_rows_by_entry(b) == [expected_scores(tokens, 9)] * 2
    refcounts = s.refcounts()
    assert [refcounts[p] for p in e0.pages] == [2, 2, 2, 2, 1]
    st = s.stats()
    assert st["prefix_hit_tokens"] == st["same_batch_hit_tokens"] == 8
    assert st["owned_pages"] == 6
    s.check_invariants()
    assert s.complete(b) == [0, 1]
    st = s.stats()
    assert st["inserted_pages"] == 5 and st["cached_pages"] == 5  # one copy; the other freed
    assert st["free_pages"] == 12 - 5
    s.add(2, tokens, 9)
    assert s.schedule().entries[0].cached_len == 8
    s.check_invariants()


def test_grpo_siblings_share_the_prompt_in_flight():
    """8 completions of a 600-token prompt submitted at once: one batch computes the
    prompt once, the other 7 read its pages, and every window is still scored exactly
    once and in order."""
    page, prompt_len = 16, 600
    prompt = tokens_of(40, prompt_len)
    seqs = [prompt + tokens_of(41 + i, 100 + 37 * i) for i in range(8)]
    start = prompt_len - 1
    shared = start // page  # 37 pages
    s = make(num_pages=512, page_size=page, max_batch_tokens=4096)
    for rid, tokens in enumerate(seqs):
        s.add(rid, tokens, start)
    b = s.schedule()
    assert [e.request_id for e in b.entries] == list(range(8))
    assert [e.cached_len for e in b.entries] == [0] + [shared * page] * 7
    assert all(e.pages[:shared] == b.entries[0].pages[:shared] for e in b.entries)
    assert b.num_tokens == len(seqs[0]) + sum(len(t) - shared * page for t in seqs[1:])
    st = s.stats()
    assert st["prefix_hit_tokens"] == st["same_batch_hit_tokens"] == 7 * shared * page
    unshared = sum(-(-len(t) // page) for t in seqs)
    assert st["owned_pages"] == unshared - 7 * shared  # 159 pages instead of 418
    s.check_invariants()
    scored = defaultdict(list)
    for e, pairs in zip(b.entries, score_rows_by_entry(b)):
        scored[e.request_id] += pairs
    assert s.complete(b) == list(range(8))
    more, _ = drain(s)
    assert not more
    for rid, tokens in enumerate(seqs):
        assert scored[rid] == expected_scores(tokens, start)
    # Same scores with the cache off, at 8x the prompt's compute.
    off = make(num_pages=512, page_size=page, max_batch_tokens=4096, enable_prefix_cache=False)
    for rid, tokens in enumerate(seqs):
        off.add(rid, tokens, start)
    assert drain(off)[0] == scored


def test_grpo_siblings_share_across_several_batches():
    """A batch too small for the whole group: siblings in later batches match the
    prompt's pages written by completed batches."""
    page = 16
    prompt = tokens_of(50, 600)
    seqs = [prompt + tokens_of(51 + i, 300) for i in range(8)]
    s = make(num_pages=512, page_size=page, max_batch_tokens=1024)
    for rid, tokens in enumerate(seqs):
        s.add(rid, tokens, 599)
    scored, batches = drain(s)
    assert all(scored[rid] == expected_scores(t, 599) for rid, t in enumerate(seqs))
    first = {e.request_id: e.cached_len for entries in batches for e in entries
             if e.begin == e.cached_len}
    assert first == {0: 0, **{rid: 592 for rid in range(1, 8)}}
    assert s.stats()["prefix_hit_tokens"] == 7 * 592
    assert sum(len(entries) for entries in batches) > 8  # some siblings were chunked


def test_writer_chunked_over_several_batches():
    """The sibling admitted in the writer's last prompt batch matches both the pages
    written by the writer's completed batches and those its chunk in this batch writes."""
    page = 4
    prompt = tokens_of(30, 40)
    a, b_ = prompt + tokens_of(31, 6), prompt + tokens_of(32, 9)
    s = make(num_pages=32, page_size=page, max_batch_tokens=30)
    s.add(0, a, 39)
    s.add(1, b_, 39)
    b1 = s.schedule()
    assert [(e.request_id, e.begin, e.end) for e in b1.entries] == [(0, 0, 30)]
    s.check_invariants()
    s.complete(b1)
    b2 = s.schedule()
    assert [(e.request_id, e.begin, e.end) for e in b2.entries] == [(0, 30, 46), (1, 36, 49)]
    e0, e1 = b2.entries
    assert e1.cached_len == 36 and e1.pages[:9] == e0.pages[:9]
    # Pages 0-6 were written by the first batch; 7 and 8 ([28, 36)) by this one.
    st = s.stats()
    assert st["prefix_hit_tokens"] == 36 and st["same_batch_hit_tokens"] == 8
    s.check_invariants()
    assert score_rows_by_entry(b2) == [expected_scores(a, 39), expected_scores(b_, 39)]
    assert s.complete(b2) == [0, 1]
    s.check_invariants()


def test_sibling_waits_for_a_prefix_written_by_an_uncompleted_batch():
    """With a batch still outstanding (pipelined scheduling), a request whose prefix
    runs into pages that batch writes is not admitted, and neither is anything behind
    it; once the batch is completed it matches the whole prefix instead of recomputing."""
    page = 4
    prompt = tokens_of(33, 24)
    s = make(num_pages=32, page_size=page, max_batch_tokens=64)
    s.add(0, prompt + tokens_of(34, 5), 23)
    b1 = s.schedule()
    s.add(1, prompt + tokens_of(35, 5), 23)
    s.add(2, tokens_of(36, 6), 0)             # unrelated, but arrived after the sibling
    assert s.schedule() is None               # request 0 in flight, request 1 waits
    assert s.stats()["waiting"] == 2
    s.check_invariants()
    s.complete(b1)
    b2 = s.schedule()
    assert [(e.request_id, e.cached_len) for e in b2.entries] == [(1, 20), (2, 0)]
    assert s.stats()["prefix_hit_tokens"] == 20
    s.complete(b2)
    # A prefix whose pages are only partly outstanding waits as well; a request with no
    # prefix in flight is admitted next to the outstanding batch.
    s2 = make(num_pages=32, page_size=page, max_batch_tokens=12)
    s2.add(0, prompt + tokens_of(34, 5), 23)
    b1 = s2.schedule()                        # [0, 12): pages 0-2
    s2.complete(b1)
    b2 = s2.schedule()                        # [12, 24): pages 3-5, outstanding
    s2.add(1, prompt + tokens_of(35, 5), 23)
    assert s2.schedule() is None
    s2.add(9, tokens_of(37, 5), 0)
    assert s2.schedule() is None              # first come, first served
    s2.complete(b2)
    b3 = s2.schedule()
    assert [(e.request_id, e.begin, e.cached_len) for e in b3.entries] == [
        (0, 24, 0), (1, 20, 20)]
    s2.complete(b3)
    drain(s2)
    s3 = make(num_pages=32, page_size=page, max_batch_tokens=64)
    s3.add(0, prompt + tokens_of(34, 5), 23)
    b1 = s3.schedule()
    s3.add(1, tokens_of(38, 9), 3)
    b2 = s3.schedule()
    assert [e.request_id for e in b2.entries] == [1]
    s3.complete(b2)
    s3.complete(b1)
    s3.check_invariants()


def test_abort_writer_while_siblings_share():
    page = 4
    prompt = tokens_of(60, 20)
    a, b_, c = (prompt + tokens_of(61 + i, 30) for i in range(3))
    s = make(num_pages=64, page_size=page, max_batch_tokens=64)
    s.add(0, a, 19)
    s.add(1, b_, 19)
    b1 = s.schedule()                         # 0 writes [0, 50); 1 reads pages 0-3, [16, 30)
    e0, e1 = b1.entries
    assert e1.cached_len == 16 and (e1.begin, e1.end) == (16, 30)
    shared = e0.pages[:4]
    s.abort(0)                                # the batch still runs whole
    s.check_invariants()
    assert [s.refcounts()[p] for p in shared] == [1] * 4
    assert [s.page_states()[p] for p in shared] == [OWNED] * 4
    own = set(e0.pages[4:])
    # Its other pages left with it: those the batch writes stay cached (unreferenced),
    # the rest are free.
    assert all(s.refcounts()[p] == 0 for p in own)
    assert s.complete(b1) == []
    s.check_invariants()
    scored, _ = drain(s)
    assert scored[1] == expected_scores(b_, 19)[11:]
    # The shared pages were written by the batch that ran; a new sibling matches them.
    st = s.stats()
    assert st["owned_pages"] == 0
    assert all(s.cached_tokens(p) == prompt[4 * i:4 * i + 4] for i, p in enumerate(shared))
    s.add(2, c, 19)
    b = s.schedule()
    assert b.entries[0].cached_len == 16 and b.entries[0].pages[:4] == shared
    s.complete(b)
    s.check_invariants()

    # Aborting the only holder of pages an outstanding batch writes leaves them cached
    # but unmatchable until that batch is completed.
    s = make(num_pages=64, page_size=page, max_batch_tokens=64)
    s.add(0, a, 19)
    b1 = s.schedule()
    s.abort(0)
    s.add(1, b_, 19)
    assert s.schedule() is None
    s.complete(b1)
    assert s.schedule().entries[0].cached_len == 16
    s.check_invariants()

    # A writer aborted after its batch completed, sibling chunked across batches.
    s = make(num_pages=64, page_size=page, max_batch_tokens=40)
    s.add(0, a, 19)
    s.add(1, b_, 19)
    b1 = s.schedule()                         # 0: [0, 40); 1 waits for budget
    s.complete(b1)
    b2 = s.schedule()                         # 0: [40, 50); 1: [16, 46) matching pages 0-3
    assert [(e.request_id, e.cached_len) for e in b2.entries] == [(0, 0), (1, 16)]
    s.abort(0)
    s.complete(b2)
    s.check_invariants()
    scored, _ = drain(s)
    assert scored[1] == expected_scores(b_, 19)[27:]
    assert s.stats()["owned_pages"] == 0


def test_flush_with_siblings_in_flight():
    page = 2
    prompt = tokens_of(70, 10)
    s = make(num_pages=64, page_size=page, max_batch_tokens=64)
    s.add(0, prompt + tokens_of(71, 6), 9)
    s.add(1, prompt + tokens_of(72, 6), 9)
    b = s.schedule()
    assert b.entries[1].cached_len == 8
    s.flush()                                 # before the batch that writes the pages ran
    assert s.stats()["cached_pages"] == 0
    s.add(2, prompt + tokens_of(73, 6), 9)
    b2 = s.schedule()
    assert b2.entries[0].cached_len == 0      # never the pre-flush pages
    s.check_invariants()
    s.complete(b)
    s.complete(b2)
    s.check_invariants()
    assert all(s.cached_tokens(p) is None for e in b.entries for p in e.pages)


def test_waiting_request_blocks_later_ones():
    s = make(num_pages=4, page_size=4, max_batch_tokens=4, enable_prefix_cache=False)
    s.add(0, tokens_of(13, 12), 0)   # 3 pages
    s.add(1, tokens_of(14, 8), 0)    # 2 pages: must wait for request 0
    s.add(2, tokens_of(15, 3), 0)    # 1 page would fit now, but arrived later
    order = []
    while (b := s.schedule()) is not None:
        order += [e.request_id for e in b.entries if e.begin == 0]
        if b.entries[0].request_id == 0:
            assert s.stats()["waiting"] == 2
        s.complete(b)
    assert order == [0, 1, 2]


def test_lru_evicts_the_least_recently_used_pages():
    page = 2
    a, b_, c = tokens_of(16, 4), tokens_of(17, 4), tokens_of(18, 6)
    s = make(num_pages=5, page_size=page)
    for rid, tokens in ((0, a), (1, b_)):
        s.add(rid, tokens, 3)
        drain(s)
    s.add(2, a + [1], 4)              # uses a's pages again: b's become the oldest
    drain(s)
    st = s.stats()
    assert st["cached_pages"] == 4 and st["free_pages"] == 1
    s.add(3, c, 1)                    # needs 3 pages: evicts b's two pages
    s.schedule()
    assert s.stats()["evicted_pages"] == 2
    cached = [s.cached_tokens(p) for p in range(5)]
    # a's pages stay; c's enter the cache as the batch writing them is scheduled.
    assert sorted(t for t in cached if t is not None) == sorted(
        [a[:2], a[2:], c[:2], c[2:4], c[4:]])
    s.check_invariants()


def test_running_first_then_admission_chunks_the_last():
    s = make(page_size=4, max_batch_tokens=10, max_batch_requests=3)
    s.add(0, tokens_of(19, 14), 0)
    b = s.schedule()
    assert [(e.begin, e.end) for e in b.entries] == [(0, 10)]
    s.add(1, tokens_of(20, 3), 0)
    s.add(2, tokens_of(21, 9), 0)
    s.add(3, tokens_of(22, 2), 0)
    s.complete(b)
    b = s.schedule()
    assert [(e.request_id, e.begin, e.end) for e in b.entries] == [(0, 10, 14), (1, 0, 3), (2, 0, 3)]
    assert b.num_tokens == 10 and b.num_requests == 3
    s.complete(b)
    b = s.schedule()
    assert [(e.request_id, e.begin, e.end) for e in b.entries] == [(2, 3, 9), (3, 0, 2)]


def test_max_batch_requests_caps_entries():
    s = make(max_batch_requests=2)
    for rid in range(5):
        s.add(rid, tokens_of(rid, 3), 1)
    sizes = [len(entries) for entries in drain(s)[1]]
    assert sizes == [2, 2, 1]


def test_abort_waiting_running_and_in_flight():
    s = make(num_pages=8, page_size=2, max_batch_tokens=4)
    s.add(0, tokens_of(23, 8), 0)
    s.add(1, tokens_of(24, 8), 0)
    b = s.schedule()                  # request 0 [0, 4); request 1 waits
    assert [e.request_id for e in b.entries] == [0]
    s.abort(1)
    s.abort(0)                        # in flight: its entry is ignored by complete()
    assert s.complete(b) == []
    st = s.stats()
    # The two pages its batch wrote stay cached: the batch ran whole.
    assert (st["waiting"], st["running"], st["free_pages"], st["cached_pages"]) == (0, 0, 6, 2)
    s.add(0, tokens_of(23, 8), 0)     # the id is free again
    assert drain(s)[0][0] == expected_scores(tokens_of(23, 8), 0)
    with pytest.raises(ValueError, match="request_id=5"):
        s.abort(5)


def test_complete_rejects_stale_and_foreign_batches():
    s, other = make(), make()
    s.add(0, [1, 2, 3], 0)
    other.add(0, [1, 2, 3], 0)
    b = s.schedule()
    with pytest.raises(ValueError, match="not outstanding"):
        other.complete(b)
    s.complete(b)
    with pytest.raises(ValueError, match="not outstanding"):
        s.complete(b)
    s.check_invariants()


def test_in_flight_requests_are_not_scheduled_twice():
    s = make(page_size=2, max_batch_tokens=3)
    s.add(0, tokens_of(25, 7), 0)
    b1 = s.schedule()
    assert s.schedule() is None       # its only request is still in flight
    s.add(1, tokens_of(26, 2), 0)
    b2 = s.schedule()
    assert [e.request_id for e in b2.entries] == [1]
    assert s.complete(b2) == [1] and s.complete(b1) == []
    assert s.schedule().entries[0].begin == 3


def test_schedule_is_none_when_idle():
    s = make()
    assert s.schedule() is None and not s.has_work()


@pytest.mark.parametrize("args, match", [
    ((0, [], 0), "token_ids is empty"),
    ((0, [1, 2], 2), "logprob_start=2"),
    ((0, [1, 2], -1), "logprob_start=-1"),
    ((0, [1] * 257, 0), "num_pages=64"),
    ((0, [1, -3], 0), r"token_ids\[1\] is -3"),
    ((0, [1, 2**31], 0), r"token_ids\[1\] is 2147483648"),
    ((0, [1, 2, 2**70], 0), r"token_ids\[2\] is 1180591620717411303424, ids must be in"),
    ((0, [1, np.int64(-2)], 0), r"token_ids\[1\] is -2"),
])
def test_add_errors_name_the_value(args, match):
    s = make()
    with pytest.raises(ValueError, match=match):
        s.add(*args)
    s.check_invariants()
    assert not s.has_work()


def test_add_duplicate_id():
    s = make()
    s.add(3, [1, 2], 0)
    with pytest.raises(ValueError, match="request 3"):
        s.add(3, [4, 5], 0)
    assert s.stats()["waiting"] == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_pages=0), "num_pages=0"),
    (dict(page_size=0), "page_size=0"),
    (dict(max_batch_tokens=0), "max_batch_tokens=0"),
    (dict(max_batch_requests=0), "max_batch_requests=0"),
    (dict(num_pages=2**20, page_size=2**12), "int32"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_token_id_containers():
    ids = [5, 0, 9, 2**31 - 1, 7]
    for container in (ids, tuple(ids), array.array("i", ids), array.array("q", ids),
                      array.array("L", ids), np.array(ids, dtype=np.int64),
                      np.array(ids, dtype=np.int32),
                      torch.tensor(ids), torch.tensor(ids, dtype=torch.int32),
                      [np.int64(t) for t in ids], [torch.tensor(t) for t in ids],
                      ids[:2] + [np.int32(ids[2])] + ids[3:]):
        s = make()
        s.add(1, container, 0)
        assert s.schedule().input_ids.tolist() == ids, type(container)
    strided = np.arange(10, dtype=np.int64)[::2]
    s = make()
    s.add(1, strided, 0)
    assert s.schedule().input_ids.tolist() == [0, 2, 4, 6, 8]
    for bad, err in (([1.5], TypeError), ([1, 2, "3"], TypeError),
                     (np.zeros((2, 2), dtype=np.int64), TypeError),
                     (np.array([1.0]), TypeError), ("abc", TypeError), (5, TypeError)):
        with pytest.raises(err):
            make().add(1, bad, 0)


def test_arrays_are_zero_copy_and_outlive_the_batch():
    s = make(page_size=2)
    s.add(0, tokens_of(27, 5), 1)
    s.add(1, tokens_of(28, 3), 0)
    b = s.schedule()
    tensors = {name: torch.frombuffer(getattr(b, name), dtype=torch.int32) for name in ARRAYS}
    assert tensors["page_table"].numel() == b.num_requests * b.max_pages
    assert tensors["cu_seqlens_q"].tolist() == [0, 5, 8]
    assert tensors["kv_lens"].tolist() == [5, 3]
    assert tensors["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    pages = [e.pages for e in b.entries]
    assert tensors["page_table"].view(2, b.max_pages).tolist() == [pages[0], pages[1] + [0]]
    assert tensors["slot_mapping"].tolist() == [
        pages[r][p // 2] * 2 + p % 2 for r, n in ((0, 5), (1, 3)) for p in range(n)]
    again = torch.frombuffer(b.input_ids, dtype=torch.int32)
    again[0] += 1                        # same memory: the change shows everywhere
    assert tensors["input_ids"][0] == again[0] == b.input_ids.tolist()[0]
    expected = {name: t.clone() for name, t in tensors.items()}
    s.complete(b)
    del b, again
    gc.collect()
    s.add(2, tokens_of(29, 9), 0)       # new allocations must not reuse the old arrays
    s.schedule()
    for name, t in tensors.items():
        assert torch.equal(t, expected[name]), name


def test_same_inputs_give_same_batches():
    def run():
        s = make(num_pages=10, page_size=2, max_batch_tokens=7, max_batch_requests=3)
        log = []
        for rid in range(12):
            s.add(rid, tokens_of(rid % 3, 4 + rid), rid % 4)
            if rid % 4 == 3 and (b := s.schedule()) is not None:
                log.append([getattr(b, n).tolist() for n in ARRAYS])
                s.complete(b)
        while (b := s.schedule()) is not None:
            log.append([getattr(b, n).tolist() for n in ARRAYS])
            s.complete(b)
        return log, s.stats()
    assert run() == run()


def test_prefix_cache_disabled():
    s = make(enable_prefix_cache=False)
    for rid in range(3):
        s.add(rid, list(range(20)), 15)
        drain(s)
    st = s.stats()
    assert st["prefix_hit_tokens"] == st["inserted_pages"] == st["cached_pages"] == 0
    assert st["free_pages"] == st["total_pages"]


def test_pages_are_handed_out_next_fit():
    """Pages come ascending from where the last allocation ended, wrapping at the end of
    the pool, so a request's pages lie consecutively in the cache while the pool ahead is
    free (the attention kernel loads a tile of consecutive pages as one TMA box), and pages
    freed behind are reused only after a lap."""
    s = make(num_pages=64, page_size=4, enable_prefix_cache=False)

    def pages_of(rid, n_pages):
        s.add(rid, tokens_of(rid, 4 * n_pages), 1)
        b = s.schedule()
        pages = list(b.entries[0].pages)
        s.complete(b)
        drain(s)
        s.check_invariants()
        return pages

    assert pages_of(0, 10) == list(range(0, 10))
    assert pages_of(1, 10) == list(range(10, 20))
    assert pages_of(2, 12) == list(range(20, 32))   # not 0-11, freed first
    assert pages_of(3, 40) == list(range(32, 64)) + list(range(0, 8))  # wraps
    # pages still held are stepped over, on the way and after the wrap
    s.add(4, tokens_of(4, 4 * 3), 1)
    held = s.schedule()
    assert list(held.entries[0].pages) == [8, 9, 10]
    s.add(5, tokens_of(5, 4 * 2), 1)
    s.add(6, tokens_of(6, 4 * 59), 1)
    b = s.schedule()
    assert [list(e.pages) for e in b.entries] == [[11, 12],
                                                  list(range(13, 64)) + list(range(0, 8))]
    s.complete(held)
    s.complete(b)
    drain(s)
    assert s.stats()["free_pages"] == 64


def test_stats_and_page_states_agree():
    s = make(num_pages=6, page_size=2, max_batch_tokens=3)
    s.add(0, list(range(6)), 0)
    s.add(1, list(range(6)), 0)
    s.complete(s.schedule())
    drain(s)
    s.add(2, list(range(6)) + [9], 5)
    s.schedule()
    states, st = s.page_states(), s.stats()
    assert st == {**st, "free_pages": states.count(FREE), "owned_pages": states.count(OWNED),
                  "cached_pages": states.count(CACHED), "total_pages": 6, "running": 1,
                  "waiting": 0, "prefix_hit_tokens": 4}
    assert all(r >= 1 for r, state in zip(s.refcounts(), states) if state == OWNED)


def test_package_exports_scheduler_without_building_the_ops():
    import subprocess
    import sys
    probe = ("import sys, tokenspeed_ext; tokenspeed_ext.Scheduler; "
             "assert 'tokenspeed_ext.ops' not in sys.modules, 'the op library was loaded'")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert tokenspeed_ext.Scheduler.__name__ == "Scheduler"
    s = tokenspeed_ext.Scheduler(num_pages=4, page_size=2, max_batch_tokens=8)
    s.add(0, [1, 2, 3], 1)
    assert s.complete(s.schedule()) == [0]


# ---- route keys: the prefix cache compares a second id per position (routing replay) ----

def _cached_len(s, rid, tokens, route=None):
    """Run one request alone; the tokens its first chunk found in the prefix cache."""
    s.add(rid, tokens, len(tokens) - 1, route)
    cached = None
    while s.has_work():
        batch = s.schedule()
        for e in batch.entries:
            if e.request_id == rid and cached is None:
                cached = e.cached_len
        s.complete(batch)
    return cached


def test_route_keys_share_only_identical_routing():
    s = make(route_keys=True)
    tokens = list(range(1, 14))  # 3 full pages of 4, then one token
    route = [7 + (i % 3) for i in range(13)]
    assert _cached_len(s, 0, tokens, route) == 0
    assert _cached_len(s, 1, tokens, route) == 12  # identical: every full page
    other = list(route)
    other[5] = 99  # differs on the second page only
    assert _cached_len(s, 2, tokens, other) == 4
    assert _cached_len(s, 3, tokens) == 0  # all-0 ids (free routing) share nothing with 7s
    assert _cached_len(s, 4, tokens, [0] * 13) == 12  # ... but share with each other
    s.check_invariants()
    # three chains: routing 7.. (3 pages), its fork at page 1 (2 pages), all-0 (3 pages)
    assert sorted(map(tuple, filter(None, (s.cached_tokens(p) for p in range(64))))) == \
        sorted([tuple(tokens[:4])] * 2 + [tuple(tokens[4:8])] * 3 + [tuple(tokens[8:12])] * 3)


def test_route_ids_checked():
    plain, keyed = make(), make(route_keys=True)
    assert keyed.route_keys and not plain.route_keys
    with pytest.raises(ValueError, match="no route_keys"):
        plain.add(0, [1, 2, 3], 0, [0, 0, 0])
    with pytest.raises(ValueError, match="route_ids"):
        keyed.add(0, [1, 2, 3], 0, [0, 0])
    with pytest.raises(ValueError, match=r"route_ids\[1\] is -2"):
        keyed.add(0, [1, 2, 3], 0, [0, -2, 0])


class _Int(int):
    """An int subclass: valid as an id, but only through the engine's slower checks."""


@given(items=st.lists(st.one_of(st.integers(-3, 40), st.booleans(), st.floats(-1, 50),
                                st.integers(2 ** 31, 2 ** 80), st.integers(-2 ** 80, -2 ** 63),
                                st.builds(np.int64, st.integers(0, 40)),
                                st.builds(_Int, st.integers(0, 40)), st.none()),
                      max_size=30),
       vocab=st.integers(1, 40))
@settings(max_examples=300, deadline=None)
def test_first_bad_id_matches_a_python_scan(items, vocab):
    """first_bad_id (the engine's one-pass id check): the index of the first item that is
    not a plain int in [0, vocab) (bools, numpy ints and int subclasses are not; huge ints
    are out of range), or -1."""
    want = next((i for i, t in enumerate(items) if type(t) is not int or not 0 <= t < vocab),
                -1)
    assert scheduler_module().first_bad_id(items, vocab) == want


def test_first_bad_id_takes_lists_only():
    for value in ((1, 2), "ab", None, np.arange(3)):
        with pytest.raises(TypeError):
            scheduler_module().first_bad_id(value, 10)
