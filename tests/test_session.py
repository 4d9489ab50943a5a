"""Engine.session: parts added between batches share the scheduler's batches and finish
one by one, each equal to compute_log_probs on its own sequences; cancelled parts free
their pages; a step that fails or is interrupted anywhere leaves the engine exact."""
from __future__ import annotations

import _thread
import random
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import hf_scores, load_hf, make_checkpoint, max_abs_diff

from tokenspeed import Engine
from tokenspeed.session import MergedSession

pytest.importorskip("transformers")
TOL = 1e-4
VOCAB = 97
SETTINGS = dict(page_size=4, max_batch_tokens=16, kv_cache_tokens=512)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("s"), "Qwen3ForCausalLM", vocab=VOCAB,
                           seed=31)
    return path, load_hf(path)


def request(rng: random.Random, n: int, max_len: int = 24) -> list[dict]:
    """A GRPO-like request: n completions of one prompt, plus a sequence of its own."""
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_len))]
    seqs = [{"prompt_token_ids": prompt,
             "completion_token_ids": [rng.randrange(VOCAB) for _ in range(rng.randint(0, 12))]}
            for _ in range(n)]
    return seqs + [{"prompt_token_ids": [rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))],
                    "completion_token_ids": [rng.randrange(VOCAB)
                                             for _ in range(rng.randint(1, 9))]}]


def no_leaks(engine: Engine) -> None:
    s = engine.stats()
    assert s["running"] == s["waiting"] == s["owned_pages"] == 0, s
    assert s["free_pages"] + s["cached_pages"] == s["total_pages"], s


def run_parts(session, requests: list[list[dict]], add_at: list[int],
              cancel: dict[int, int] | None = None) -> tuple[dict, list[int]]:
    """Add request i before step add_at[i] (cancel request j before step cancel[j]); step
    until every part not cancelled finished. Returns {i: result} and the order in which
    the parts finished."""
    cancel = cancel or {}
    parts: dict[int, object] = {}
    results: dict[int, dict] = {}
    order: list[int] = []
    step = 0
    while len(parts) < len(requests) or any(
            not p.done and i not in cancel for i, p in parts.items()):
        for i, at in enumerate(add_at):
            if at == step:
                parts[i] = session.add(requests[i])
        for j, at in cancel.items():
            if at == step and j in parts:
                session.cancel(parts[j])
        for part in session.step():
            i = next(k for k, p in parts.items() if p is part)
            assert i not in cancel or cancel[i] > step
            order.append(i)
            results[i] = part.result()
        step += 1
        assert step < 10_000
    return results, order


def test_one_part_is_compute_log_probs_bitwise(ckpt):
    path, _ = ckpt
    rng = random.Random(1)
    seqs = request(rng, 5) + request(rng, 3)
    options = dict(temperature=0.7, return_entropy=True, top_logprobs=3)
    with Engine(path, **SETTINGS) as engine:
        direct = engine.compute_log_probs(seqs, **options)
        engine.flush_cache()
        with engine.session(**options) as session:
            part = session.add(seqs)
            while not part.done:
                session.step()
            assert part.result() == direct
        no_leaks(engine)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), deterministic=st.booleans())
def test_parts_added_between_batches_equal_their_own_calls(ckpt, seed, deterministic):
    """Parts join while earlier ones run and finish in the order they were added (the
    scheduler is first come, first served); each equals a direct call of its sequences
    alone: bitwise in deterministic mode, to the GEMMs' rounding otherwise, and HF."""
    path, hf = ckpt
    rng = random.Random(seed)
    requests = [request(rng, rng.randint(1, 5)) for _ in range(rng.randint(2, 5))]
    add_at = sorted(rng.randint(0, 8) for _ in requests)
    add_at[0] = 0
    with Engine(path, deterministic=deterministic, **SETTINGS) as engine:
        with engine.session(temperature=0.8, return_entropy=True) as session:
            results, order = run_parts(session, requests, add_at)
        assert order == sorted(order)
        no_leaks(engine)
        for i, seqs in enumerate(requests):
            engine.flush_cache()
            direct = engine.compute_log_probs(seqs, 0.8, return_entropy=True)
            if deterministic:
                assert results[i] == direct
            else:
                assert results[i]["tokens"] == direct["tokens"]
                assert max_abs_diff(results[i]["log_probs"], direct["log_probs"]) <= 1e-5
                assert max_abs_diff(results[i]["entropy"], direct["entropy"]) <= 1e-5
            assert max_abs_diff(results[i]["log_probs"], hf_scores(hf, seqs, 0.8)[0]) <= TOL


def test_rich_and_plain_parts_share_batches(ckpt):
    """Parts with different per-sequence filters and different numbers of requested ids
    (or none) share batches; each gets its own rich outputs."""
    path, _ = ckpt
    rng = random.Random(5)
    plain = request(rng, 3)
    filtered = [dict(s, top_k=4, top_p=0.9) for s in request(rng, 3)]
    ids_wide = [dict(s, token_ids=[1, 2, 3, 4, 5]) for s in request(rng, 2)]
    ids_narrow = [dict(s, token_ids=[7]) for s in request(rng, 2)]
    requests = [plain, filtered, ids_wide, ids_narrow]
    with Engine(path, deterministic=True, **SETTINGS) as engine:
        with engine.session(temperature=0.9, return_entropy=True) as session:
            results, _ = run_parts(session, requests, [0, 0, 1, 1])
        for i, seqs in enumerate(requests):
            engine.flush_cache()
            assert results[i] == engine.compute_log_probs(seqs, 0.9, return_entropy=True), i
        assert "token_ids_logprobs" not in results[0]
        assert [len(r) for r in results[2]["token_ids_logprobs"][0]] == \
            [5] * len(ids_wide[0]["completion_token_ids"])
        no_leaks(engine)


def test_cancelled_part_frees_its_pages_and_others_are_exact(ckpt):
    path, hf = ckpt
    rng = random.Random(9)
    requests = [request(rng, 4, max_len=40) for _ in range(3)]
    with Engine(path, **SETTINGS) as engine:
        real = engine.shard.scheduler
        scheduled: list[set[int]] = []

        class Recording:
            def __getattr__(self, name):
                return getattr(real, name)

            def schedule(self):
                batch = real.schedule()
                scheduled.append({e.request_id for e in batch.entries})
                return batch
        engine.shard.scheduler = Recording()
        with engine.session() as session:
            parts = [session.add(seqs) for seqs in requests]
            session.step()
            gone = set(parts[1].open)
            assert gone
            session.cancel(parts[1])
            cancelled_at = len(scheduled)
            done = []
            while not (parts[0].done and parts[2].done):
                done += session.step()
        engine.shard.scheduler = real
        assert parts[1] not in done and not parts[1].done
        assert not any(ids & gone for ids in scheduled[cancelled_at:])
        no_leaks(engine)
        for i in (0, 2):
            ref = hf_scores(hf, requests[i])[0]
            assert max_abs_diff(parts[i].result()["log_probs"], ref) <= TOL


def test_bad_part_is_rejected_alone(ckpt):
    path, _ = ckpt
    rng = random.Random(11)
    good = request(rng, 3)
    with Engine(path, **SETTINGS) as engine:
        with engine.session(temperature=0.5) as session:
            first = session.add(good)
            session.step()
            with pytest.raises(ValueError, match=r"sequence 1: completion_token_ids\[0\]"):
                session.add([good[0], {"prompt_token_ids": [1],
                                       "completion_token_ids": [VOCAB]}])
            second = session.add(good)
            while not (first.done and second.done):
                session.step()
        engine.flush_cache()
        direct = engine.compute_log_probs(good, 0.5)["log_probs"]
        assert max_abs_diff(second.result()["log_probs"], direct) <= 1e-5
        # options are checked with each part, as compute_log_probs checks them
        with engine.session(temperature=0.0) as session:
            with pytest.raises(ValueError, match="temperature"):
                session.add(good)
        no_leaks(engine)


def test_open_session_excludes_other_calls_and_weight_writes(ckpt):
    path, _ = ckpt
    rng = random.Random(13)
    seqs = request(rng, 3, max_len=40)
    from safetensors.torch import load_file
    weights = load_file(path / "model.safetensors")
    with Engine(path, **SETTINGS) as engine:
        with engine.session() as session:
            part = session.add(seqs)
            session.step()
            with pytest.raises(RuntimeError, match="session is open"):
                engine.compute_log_probs(seqs)
            with pytest.raises(RuntimeError, match="requests in flight"):
                engine.update_weights(weights)
            assert engine.stats()["weight_version"] == 0
            while not part.done:
                session.step()
            engine.update_weights(weights)  # nothing in flight: allowed
            later = session.add(seqs)
            while not later.done:
                session.step()
        assert part.result()["weight_version"] == 0
        assert later.result()["weight_version"] == 1
        assert max_abs_diff(engine.compute_log_probs(seqs)["log_probs"],
                            later.result()["log_probs"]) <= 1e-5
        no_leaks(engine)


@pytest.mark.parametrize("exc", [RuntimeError("device lost"), KeyboardInterrupt()])
@pytest.mark.parametrize("where", ["run", "copy"])
def test_failed_step_leaves_engine_exact(ckpt, exc, where):
    """A forward that dies after writing garbage K/V, or a copy-out that fails, with
    several parts in flight: every request is aborted, the cache flushed, the session
    closed; the engine then scores exactly."""
    path, hf = ckpt
    rng = random.Random(17)
    requests = [request(rng, 3) for _ in range(3)]
    ref = [hf_scores(hf, seqs)[0] for seqs in requests]
    with Engine(path, **SETTINGS) as engine:
        shard = engine.shard
        real_run, real_copy, calls = shard.runner.run, shard._copy_scores, []

        def failing_run(batch, *args):
            calls.append(batch)
            slots = torch.frombuffer(bytearray(batch.slot_mapping), dtype=torch.int32).long()
            for k, v in zip(shard.kv_cache.k, shard.kv_cache.v):
                k.view(-1, *k.shape[2:])[slots] = float("nan")
                v.view(-1, *v.shape[2:])[slots] = float("nan")
            if len(calls) == 4:
                raise exc
            return real_run(batch, *args)

        def failing_copy(copy):
            calls.append(copy)
            if len(calls) == 2:
                raise exc
            real_copy(copy)
        if where == "run":
            shard.runner.run = failing_run
        else:
            shard._copy_scores = failing_copy
        with engine.session() as session:
            parts = [session.add(requests[0])]
            with pytest.raises(type(exc)):
                for step in range(100):
                    if step in (1, 2):
                        parts.append(session.add(requests[step]))
                    session.step()
            with pytest.raises(RuntimeError, match="closed"):
                session.step()
        shard.runner.run, shard._copy_scores = real_run, real_copy
        no_leaks(engine)
        assert engine.stats()["cached_pages"] == 0
        for seqs, r in zip(requests, ref):
            assert max_abs_diff(engine.compute_log_probs(seqs)["log_probs"], r) <= TOL
        no_leaks(engine)


def test_session_interrupted_anywhere_leaves_engine_exact(ckpt):
    """Ctrl-C from a timer lands wherever it lands while parts are added and stepped
    (batches of two tokens make every step short, so it lands in many places): after
    it, the session is closed, no request or page is left and every score is exact."""
    path, hf = ckpt
    rng = random.Random(19)
    requests = [request(rng, 3) for _ in range(3)]
    ref = [hf_scores(hf, seqs)[0] for seqs in requests]

    def run(engine: Engine) -> None:
        with engine.session() as session:
            parts = [session.add(requests[0])]
            for step in range(100_000):
                if step in (2, 5):
                    parts.append(session.add(requests[len(parts)]))
                session.step()
                if len(parts) == 3 and all(p.done for p in parts):
                    return
    landed = 0
    with Engine(path, page_size=1, max_batch_tokens=2, kv_cache_tokens=512) as engine:
        durations = []
        for _ in range(3):
            start = time.perf_counter()
            run(engine)
            durations.append(time.perf_counter() - start)
        duration = min(durations)  # the timer lands within a run, mostly
        for trial in range(16):
            timer = threading.Timer(rng.uniform(0, 0.8 * duration), _thread.interrupt_main)
            inside = False
            try:
                timer.start()
                inside = True
                run(engine)
                inside = False
                timer.join()
                time.sleep(0.05)  # a late interrupt lands here, outside the session
            except KeyboardInterrupt:
                landed += inside
            timer.join()
            no_leaks(engine)
            for seqs, r in zip(requests, ref):
                assert max_abs_diff(engine.compute_log_probs(seqs)["log_probs"], r) <= TOL
        assert landed >= 8


def test_merged_session_scores_parts_in_one_call_per_step(ckpt):
    """The session over worker processes (each step one compute_log_probs of the parts
    added since the last), here over a local backend."""
    path, _ = ckpt
    rng = random.Random(23)
    requests = [request(rng, 2) for _ in range(3)]
    with Engine(path, **SETTINGS) as engine:
        calls = []

        def call(method, *args, **kwargs):
            calls.append(method)
            return getattr(engine.shard, method)(*args, **kwargs)
        session = MergedSession(call, 0.6, return_entropy=True, return_tensors=False,
                                return_routed_experts=False, rich_options={})
        a, b = session.add(requests[0]), session.add(requests[1])
        with pytest.raises(ValueError, match="sequence 0"):
            session.add([{"prompt_token_ids": [], "completion_token_ids": [1]}])
        assert session.step() == [a, b] and calls.count("compute_log_probs") == 1
        c = session.add(requests[2])
        session.cancel(c)
        assert session.step() == [] and calls.count("compute_log_probs") == 1
        engine.flush_cache()  # the merged call ran on an empty cache too
        merged = engine.compute_log_probs(requests[0] + requests[1], 0.6, return_entropy=True)
        n = len(requests[0])
        assert a.result()["log_probs"] == merged["log_probs"][:n]
        assert b.result()["entropy"] == merged["entropy"][n:]
        assert b.result()["weight_version"] == 0
        with pytest.raises(ValueError, match="returns lists"):
            MergedSession(call, 1.0, return_entropy=False, return_tensors=True,
                          return_routed_experts=False, rich_options={})
