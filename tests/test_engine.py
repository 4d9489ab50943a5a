"""Engine.compute_log_probs end to end: properties against HF, invariances, the KV pool,
update_weights, input validation, the batch loop's device waits and check_batches."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import hf_scores, load_hf, make_checkpoint, max_abs_diff, random_sequences

import tokenspeed.shard as shard_module
from tokenspeed import Engine

pytest.importorskip("transformers")
TOL = 1e-4
VOCAB = 97
PROPERTY = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("a"), "Qwen3ForCausalLM", vocab=VOCAB,
                           seed=11)
    return path, load_hf(path)


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("b"), "Qwen3ForCausalLM", vocab=VOCAB,
                           seed=12)
    return path, load_hf(path)


def no_leaks(engine: Engine) -> None:
    s = engine.stats()
    assert s["free_pages"] + s["cached_pages"] == s["total_pages"], s


def assert_recovered(engine: Engine, seqs: list[dict], ref_lp: list[list[float]]) -> None:
    """After a failed call: no request or page left behind, and the next call is exact."""
    no_leaks(engine)
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0
    assert max_abs_diff(engine.compute_log_probs(seqs)["log_probs"], ref_lp) <= TOL
    no_leaks(engine)


def grpo_workload(seed: int, groups: int, group_size: int, vocab: int = VOCAB) -> list[dict]:
    """GRPO groups (one prompt, several completions, submitted together) between a few
    unrelated sequences, some with an empty completion."""
    gen = torch.Generator().manual_seed(seed)
    seqs = random_sequences(gen, vocab, 4)
    for g in range(groups):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 30, (1,), generator=gen)),),
                               generator=gen).tolist()
        seqs += [{"prompt_token_ids": prompt,
                  "completion_token_ids": torch.randint(0, vocab, (1 + (g + i) % 9,),
                                                        generator=gen).tolist()}
                 for i in range(group_size)]
    return seqs + random_sequences(gen, vocab, 4)


def count_calls(obj, name: str) -> list:
    """Wrap obj.name so that every call is recorded; returns the record."""
    calls, real = [], getattr(obj, name)

    def counted(*args):
        calls.append(args)
        return real(*args)
    setattr(obj, name, counted)
    return calls


tokens = st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=14)
sequence = st.builds(lambda p, c: {"prompt_token_ids": p, "completion_token_ids": c},
                     st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20), tokens)


@PROPERTY
@given(seqs=st.lists(sequence, max_size=6), max_batch_tokens=st.integers(1, 48),
       page_size=st.sampled_from([1, 4, 16]), prefix=st.booleans(),
       temperature=st.sampled_from([1.0, 0.45, 2.5]))
def test_matches_hf_any_chunking(ckpt, seqs, max_batch_tokens, page_size, prefix, temperature):
    path, hf = ckpt
    ref_lp, ref_ent = hf_scores(hf, seqs, temperature)
    with Engine(path, page_size=page_size, max_batch_tokens=max_batch_tokens,
                kv_cache_tokens=256, enable_prefix_cache=prefix) as engine:
        for _ in range(2):  # the second pass hits the prefix cache when it is on
            out = engine.compute_log_probs(seqs, temperature, return_entropy=True)
            assert [len(x) for x in out["log_probs"]] == [len(s["completion_token_ids"])
                                                           for s in seqs]
            assert max_abs_diff(out["log_probs"], ref_lp) <= TOL
            assert max_abs_diff(out["entropy"], ref_ent) <= TOL
            no_leaks(engine)


@PROPERTY
@given(seqs=st.lists(sequence, min_size=1, max_size=6), company=st.lists(sequence, max_size=4),
       data=st.data())
def test_order_and_company_invariance(ckpt, seqs, company, data):
    path, _ = ckpt
    with Engine(path, page_size=4, max_batch_tokens=24, kv_cache_tokens=512) as engine:
        alone = engine.compute_log_probs(seqs)["log_probs"]
        mixed = data.draw(st.permutations(list(range(len(seqs))) + [-1 - i for i in
                                                                     range(len(company))]))
        batch = [seqs[i] if i >= 0 else company[-1 - i] for i in mixed]
        out = engine.compute_log_probs(batch)["log_probs"]
    again = [out[mixed.index(i)] for i in range(len(seqs))]
    assert max_abs_diff(again, alone) <= 1e-5


@PROPERTY
@given(prompt_pages=st.integers(1, 3), extra=st.sampled_from([0, 0, 1, 3]),
       page_size=st.sampled_from([4, 16]), n=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_grpo_groups(ckpt, prompt_pages, extra, page_size, n, seed):
    """One prompt, many completions; page-aligned prompt lengths (extra == 0) included."""
    path, hf = ckpt
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (prompt_pages * page_size + extra,), generator=gen).tolist()
    seqs = [{"prompt_token_ids": prompt,
             "completion_token_ids": torch.randint(0, VOCAB, (1 + i % 5,), generator=gen).tolist()}
            for i in range(n)]
    ref_lp, _ = hf_scores(hf, seqs)
    with Engine(path, page_size=page_size, max_batch_tokens=64, kv_cache_tokens=1024) as engine:
        first = engine.compute_log_probs(seqs)["log_probs"]
        second = engine.compute_log_probs(seqs)["log_probs"]
        assert max_abs_diff(first, ref_lp) <= TOL
        assert max_abs_diff(second, first) <= 1e-5
        if len(prompt) - 1 >= page_size:  # at least one full page before the scored window
            assert engine.stats()["prefix_hit_tokens"] > 0
        no_leaks(engine)


def test_tiny_pool_exact_and_no_leaks(ckpt):
    path, hf = ckpt
    gen = torch.Generator().manual_seed(5)
    seqs = [{"prompt_token_ids": torch.randint(0, VOCAB, (int(p),), generator=gen).tolist(),
             "completion_token_ids": torch.randint(0, VOCAB, (int(c),), generator=gen).tolist()}
            for p, c in zip(torch.randint(1, 30, (24,), generator=gen),
                            torch.randint(0, 12, (24,), generator=gen))]
    ref_lp, _ = hf_scores(hf, seqs)
    # 12 pages of 4: far less than the ~600 tokens of the workload; the longest fits
    with Engine(path, page_size=4, max_batch_tokens=16, kv_cache_tokens=48) as engine:
        assert engine.stats()["total_pages"] == 12
        for _ in range(2):
            out = engine.compute_log_probs(seqs)
            assert max_abs_diff(out["log_probs"], ref_lp) <= TOL
            no_leaks(engine)


def test_update_weights_matches_fresh_engine(ckpt, ckpt_b):
    from safetensors.torch import load_file
    (path_a, _), (path_b, hf_b) = ckpt, ckpt_b
    gen = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, VOCAB, (20,), generator=gen).tolist()
    seqs = [{"prompt_token_ids": prompt, "completion_token_ids": [i, i + 1, i + 2]}
            for i in range(5)]
    new = load_file(path_b / "model.safetensors")
    with Engine(path_a, page_size=4, kv_cache_tokens=512) as engine, \
            Engine(path_b, page_size=4, kv_cache_tokens=512) as fresh:
        old = engine.compute_log_probs(seqs)["log_probs"]
        engine.compute_log_probs(seqs)
        assert engine.stats()["cached_pages"] > 0
        engine.update_weights(new)
        assert engine.stats()["weight_version"] == 1
        got = engine.compute_log_probs(seqs)["log_probs"]
        assert got == fresh.compute_log_probs(seqs)["log_probs"]
        assert max_abs_diff(got, hf_scores(hf_b, seqs)[0]) <= TOL
        assert max_abs_diff(got, old) > 1e-2
        # an iterable of pairs works too, and one changed tensor changes the scores
        engine.update_weights([("model.norm.weight", new["model.norm.weight"] * 2)])
        assert engine.stats()["weight_version"] == 2
        assert max_abs_diff(engine.compute_log_probs(seqs)["log_probs"], got) > 1e-3


@pytest.mark.parametrize("weights, error, match", [
    ({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, ValueError, "up_proj.*shape"),
    ({"model.layers.9.mlp.up_proj.weight": torch.zeros(3, 3)}, ValueError, "unknown weight"),
    ({"model.norm.weight": [1.0] * 32}, TypeError, "model.norm.weight"),
])
def test_update_weights_rejects_and_changes_nothing(ckpt, weights, error, match):
    path, hf = ckpt
    seqs = [{"prompt_token_ids": [1, 2, 3, 4, 5], "completion_token_ids": [6, 7, 8]}]
    with Engine(path, kv_cache_tokens=256) as engine:
        before = engine.compute_log_probs(seqs)["log_probs"]
        good = {"model.norm.weight": torch.ones(32)}
        with pytest.raises(error, match=match):
            engine.update_weights({**good, **weights})
        assert engine.stats()["weight_version"] == 0
        assert engine.compute_log_probs(seqs)["log_probs"] == before


BAD_INPUTS = [
    ([{"prompt_token_ids": [], "completion_token_ids": [1]}], ValueError, "sequence 0: empty prompt"),
    ([{"prompt_token_ids": [1]}], ValueError, "sequence 0: missing key 'completion_token_ids'"),
    ([{"completion_token_ids": [1]}], ValueError, "sequence 0: missing key 'prompt_token_ids'"),
    ([{"prompt_token_ids": [1], "completion_token_ids": [VOCAB]}], ValueError,
     rf"sequence 0: completion_token_ids\[0\] is {VOCAB}, vocabulary is \[0, {VOCAB}\)"),
    ([{"prompt_token_ids": [-1], "completion_token_ids": [2]}], ValueError,
     r"prompt_token_ids\[0\] is -1"),
    ([{"prompt_token_ids": [1, 2.0], "completion_token_ids": [2]}], TypeError,
     r"prompt_token_ids\[1\] is 2.0"),
    ([{"prompt_token_ids": [1, True], "completion_token_ids": [2]}], TypeError,
     r"prompt_token_ids\[1\] is True"),
    ([{"prompt_token_ids": [1, 2 ** 70], "completion_token_ids": [2]}], ValueError,
     rf"prompt_token_ids\[1\] is {2 ** 70}, vocabulary"),
    ([{"prompt_token_ids": "abc", "completion_token_ids": [2]}], TypeError, "list of ints"),
    (["not a dict"], TypeError, "sequence 0"),
    ({"prompt_token_ids": [1], "completion_token_ids": [2]}, TypeError, "list of dicts"),
    ([{"prompt_token_ids": [1] * 600, "completion_token_ids": [2]}], ValueError,
     "sequence 0: length 601 exceeds the model's max_position_embeddings 512"),
    ([{"prompt_token_ids": [1] * 300, "completion_token_ids": [2]}], ValueError,
     "sequence 0: length 301 does not fit the KV pool of 256 tokens"),
]


def test_bad_inputs_raise_and_engine_stays_exact(ckpt):
    path, hf = ckpt
    good = [{"prompt_token_ids": [3, 1, 4, 1, 5], "completion_token_ids": [9, 2, 6]},
            {"prompt_token_ids": [5, 3], "completion_token_ids": [5, 8, 9, 7]}]
    ref_lp, _ = hf_scores(hf, good)
    with Engine(path, page_size=4, max_batch_tokens=8, kv_cache_tokens=256) as engine:
        for bad, error, match in BAD_INPUTS:
            # the bad sequence comes after a good one: nothing may run for either
            batch = good[:1] + bad if isinstance(bad, list) else bad
            msg = match.replace("sequence 0", "sequence 1") if isinstance(bad, list) else match
            with pytest.raises(error, match=msg):
                engine.compute_log_probs(batch)
            no_leaks(engine)
            assert engine.stats()["scored_tokens"] == 0
        for temperature in (0.0, -1.0, math.inf, math.nan):
            with pytest.raises(ValueError, match="temperature"):
                engine.compute_log_probs(good, temperature)
        with pytest.raises(TypeError, match="temperature"):
            engine.compute_log_probs(good, "1.0")
        assert max_abs_diff(engine.compute_log_probs(good)["log_probs"], ref_lp) <= TOL
        no_leaks(engine)


def test_shapes_empty_and_tensors(ckpt):
    path, hf = ckpt
    seqs = [{"prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5]},
            {"prompt_token_ids": [7], "completion_token_ids": []},
            {"prompt_token_ids": torch.tensor([8, 9]), "completion_token_ids": (10, 11, 12)}]
    ref_lp, ref_ent = hf_scores(hf, [{k: list(v) for k, v in s.items()} for s in seqs], 0.8)
    with Engine(path, kv_cache_tokens=256) as engine:
        assert engine.compute_log_probs([]) == {"log_probs": [], "tokens": [],
                                                "weight_version": 0}
        out = engine.compute_log_probs(seqs, 0.8, return_entropy=True)
        assert out["tokens"] == [[4, 5], [], [10, 11, 12]]
        assert [len(x) for x in out["log_probs"]] == [2, 0, 3]
        t = engine.compute_log_probs(seqs, 0.8, return_entropy=True, return_tensors=True)
        assert t["log_probs"].shape == t["entropy"].shape == t["mask"].shape == (3, 3)
        assert t["log_probs"].dtype == torch.float32 and t["mask"].dtype == torch.bool
        assert t["mask"].sum(1).tolist() == [2, 0, 3]
        assert t["tokens"][2].tolist() == [10, 11, 12]
        for i, row in enumerate(out["log_probs"]):
            assert t["log_probs"][i, :len(row)].tolist() == row
            assert not t["log_probs"][i, len(row):].any()
        assert max_abs_diff(out["entropy"], ref_ent) <= TOL
        empty = engine.compute_log_probs([], return_tensors=True)
        assert empty["log_probs"].shape == (0, 0)
        stats = engine.stats()
        for key in ("total_pages", "free_pages", "cached_pages", "prefix_hit_tokens",
                    "scored_tokens", "weight_version"):
            assert key in stats
        assert stats["scored_tokens"] == 10


def test_close_and_config_errors(ckpt):
    path, _ = ckpt
    engine = Engine(path, device=torch.device("cpu"), dtype=torch.float32, kv_cache_tokens=64)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.compute_log_probs([])
    engine.close()
    for kwargs, error in [({"dtype": "int8"}, ValueError), ({"device": "tpu"}, ValueError),
                          ({"page_size": 0}, ValueError), ({"max_batch_tokens": 1.5}, TypeError),
                          ({"tp_size": 3}, ValueError), ({"kv_cache_tokens": 3}, ValueError)]:
        with pytest.raises(error):
            Engine(path, **kwargs)
    with pytest.raises(FileNotFoundError):
        Engine(path / "nope")


def test_builtin_model_is_a_real_hf_checkpoint(tmp_path, monkeypatch):
    from tokenspeed.builtin import builtin_model_dir, builtin_weights
    monkeypatch.setenv("TOKENSPEED_CACHE", str(tmp_path))
    path = builtin_model_dir()
    assert path.parent == tmp_path and builtin_model_dir() == path
    first = builtin_weights()
    assert all(torch.equal(first[k], v) for k, v in builtin_weights().items())
    seqs = [{"prompt_token_ids": [1, 50, 300], "completion_token_ids": [7, 511, 42]}]
    with Engine(path) as engine:
        out = engine.compute_log_probs(seqs)
    assert max_abs_diff(out["log_probs"], hf_scores(load_hf(path), seqs)[0]) <= TOL


@pytest.mark.parametrize("exc", [RuntimeError("device lost"), KeyboardInterrupt()])
def test_error_mid_batch_leaves_engine_exact(ckpt, exc):
    """A forward that dies after writing garbage K/V (an interrupt, a device error) must
    leave no request, batch or page behind that a later call could wait on or read."""
    path, hf = ckpt
    gen = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, VOCAB, (13,), generator=gen).tolist()
    seqs = [{"prompt_token_ids": prompt,
             "completion_token_ids": torch.randint(0, VOCAB, (2 + i,), generator=gen).tolist()}
            for i in range(4)]
    ref_lp, _ = hf_scores(hf, seqs)
    with Engine(path, page_size=4, max_batch_tokens=8, kv_cache_tokens=256) as engine:
        real_run, calls = engine.shard.runner.run, []

        def failing_run(batch, *args):
            calls.append(batch)
            slots = torch.frombuffer(bytearray(batch.slot_mapping), dtype=torch.int32).long()
            for k, v in zip(engine.shard.kv_cache.k, engine.shard.kv_cache.v):
                k.view(-1, *k.shape[2:])[slots] = float("nan")
                v.view(-1, *v.shape[2:])[slots] = float("nan")
            if len(calls) == 2:
                raise exc
            return real_run(batch, *args)

        engine.shard.runner.run = failing_run
        with pytest.raises(type(exc)):
            engine.compute_log_probs(seqs)
        engine.shard.runner.run = real_run
        assert_recovered(engine, seqs, ref_lp)


@pytest.mark.parametrize("device", DEVICES)
def test_many_batches_match_alone_and_hf(ckpt, device, monkeypatch):
    """Dozens of tiny batches, GRPO groups sharing their prompt pages in flight: the loop
    completes each batch once it is enqueued and copies all scores out once per call, and
    every row still lands where it belongs."""
    path, hf = ckpt
    seqs = grpo_workload(21, groups=6, group_size=5)
    ref_lp, ref_ent = hf_scores(hf, seqs, 0.7)
    settings = dict(device=device, dtype="float32", page_size=4, max_batch_tokens=16,
                    kv_cache_tokens=1024)
    with Engine(path, **settings) as engine:
        batches = count_calls(engine.shard.runner, "run")
        copies = count_calls(engine.shard, "_copy_scores")
        first = engine.compute_log_probs(seqs, 0.7, return_entropy=True)
        assert len(batches) >= 24 and len(copies) == 1
        assert max_abs_diff(first["log_probs"], ref_lp) <= TOL
        assert max_abs_diff(first["entropy"], ref_ent) <= TOL
        assert engine.stats()["same_batch_hit_tokens"] > 0
        second = engine.compute_log_probs(seqs, 0.7, return_entropy=True)
        assert engine.stats()["prefix_hit_tokens"] > 0
        assert max_abs_diff(second["log_probs"], first["log_probs"]) <= 1e-5
        assert max_abs_diff(second["entropy"], first["entropy"]) <= 1e-5
        no_leaks(engine)
    # the same batches, copied out every few rows and checked before they run: same bits
    monkeypatch.setattr(shard_module, "MAX_PENDING_ROWS", 5)
    with Engine(path, check_batches=True, **settings) as engine:
        copies = count_calls(engine.shard, "_copy_scores")
        assert engine.compute_log_probs(seqs, 0.7, return_entropy=True) == first
        assert len(copies) > 10
        no_leaks(engine)
    with Engine(path, enable_prefix_cache=False, **settings) as alone:
        for seq, lp in zip(seqs, first["log_probs"]):
            assert max_abs_diff(alone.compute_log_probs([seq], 0.7)["log_probs"], [lp]) <= 1e-5


@pytest.mark.gpu
def test_batch_loop_never_waits_for_the_device(tmp_path):
    """Between a call's start and its one copy of the scores to the host, nothing may
    synchronise with the GPU: torch's sync debug mode turns any such wait into an error.
    Head dim 64 in bf16 takes the attention kernel that needs no host copy of the lengths."""
    path = make_checkpoint(tmp_path, "LlamaForCausalLM", vocab=VOCAB, hidden=256, heads=4,
                           kv_heads=2, seed=13)
    warm = grpo_workload(30, groups=8, group_size=6)
    seqs = grpo_workload(31, groups=8, group_size=6)
    with Engine(path, device="cuda", dtype="bfloat16", page_size=16, max_batch_tokens=64,
                kv_cache_tokens=8192) as engine:
        engine.compute_log_probs(warm, return_entropy=True)
        batches = count_calls(engine.shard.runner, "run")
        copy, copies = engine.shard._copy_scores, []

        def unchecked_copy(*args):
            copies.append(args)
            torch.cuda.set_sync_debug_mode(0)
            try:
                copy(*args)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        engine.shard._copy_scores = unchecked_copy
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = engine.compute_log_probs(seqs, return_entropy=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert len(batches) >= 8 and len(copies) == 1
        # the same two calls again from an empty prefix cache, without the debug mode
        engine.shard._copy_scores = copy
        engine.shard.scheduler.flush()
        engine.compute_log_probs(warm, return_entropy=True)
        assert engine.compute_log_probs(seqs, return_entropy=True) == out


CORRUPTIONS = [
    ("slot_mapping", lambda engine: engine.shard.kv_cache.num_tokens + 3,
     r"slot_mapping\[0\] is \d+, but the cache has 256 slots"),
    ("page_table", lambda engine: engine.shard.kv_cache.num_pages + 3,
     r"page_table\[0, 0\] is 67, outside \[0, 64\)"),
    ("score_targets", lambda engine: VOCAB,
     rf"score_targets\[0\] is {VOCAB}, outside the vocabulary \[0, {VOCAB}\)"),
]


def corrupt_third_scored_batch(engine: Engine, array: str, value: int) -> list:
    """Make the runner overwrite element 0 of one array of the third batch that scores rows."""
    real_run, scored = engine.shard.runner.run, []

    def corrupting_run(batch, *args):
        if batch.num_scored:
            scored.append(batch)
            if len(scored) == 3:
                torch.frombuffer(getattr(batch, array), dtype=torch.int32)[0] = value
        return real_run(batch, *args)
    engine.shard.runner.run = corrupting_run
    return scored


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("array, bad_value, match", CORRUPTIONS)
def test_check_batches_rejects_a_corrupt_batch(ckpt, device, array, bad_value, match):
    path, hf = ckpt
    seqs = grpo_workload(22, groups=3, group_size=3)
    ref_lp, _ = hf_scores(hf, seqs)
    with Engine(path, device=device, dtype="float32", page_size=4, max_batch_tokens=16,
                kv_cache_tokens=256, check_batches=True) as engine:
        real_run = engine.shard.runner.run
        scored = corrupt_third_scored_batch(engine, array, bad_value(engine))
        with pytest.raises(RuntimeError, match=match):
            engine.compute_log_probs(seqs)
        assert len(scored) == 3
        engine.shard.runner.run = real_run
        assert_recovered(engine, seqs, ref_lp)


def test_unchecked_bad_target_scores_minus_inf(ckpt):
    """Without check_batches nothing reads the targets back: a bad one scores -inf and
    every other row is still exact."""
    path, hf = ckpt
    seqs = grpo_workload(22, groups=3, group_size=3)
    ref_lp, _ = hf_scores(hf, seqs)
    with Engine(path, page_size=4, max_batch_tokens=16, kv_cache_tokens=256) as engine:
        corrupt_third_scored_batch(engine, "score_targets", VOCAB)
        out = engine.compute_log_probs(seqs)["log_probs"]
    bad = [(i, j) for i, row in enumerate(out) for j, x in enumerate(row) if x == -math.inf]
    assert len(bad) == 1
    i, j = bad[0]
    out[i][j] = ref_lp[i][j]
    assert max_abs_diff(out, ref_lp) <= TOL


def test_error_while_copying_scores_leaves_engine_exact(ckpt):
    """The copy to the host is where an error of any batch still in flight surfaces: the
    call's requests go, the prefix cache (whose pages those batches wrote) is flushed."""
    path, hf = ckpt
    seqs = grpo_workload(23, groups=3, group_size=3)
    ref_lp, _ = hf_scores(hf, seqs)
    with Engine(path, page_size=4, max_batch_tokens=16, kv_cache_tokens=256) as engine:
        copy = engine.shard._copy_scores

        def failing_copy(*args):
            raise RuntimeError("device lost")
        engine.shard._copy_scores = failing_copy
        with pytest.raises(RuntimeError, match="device lost"):
            engine.compute_log_probs(seqs)
        engine.shard._copy_scores = copy
        assert engine.stats()["cached_pages"] == 0
        assert_recovered(engine, seqs, ref_lp)


def weight_interrupts(monkeypatch, at: int, action) -> list[str]:
    """Run ``action`` just before the ``at``-th tensor an update writes; returns the names
    written."""
    from tokenspeed.models.loader import WeightMap
    real_load, written = WeightMap.load, []

    def load(self, name, tensor):
        if len(written) == at:
            action()
        written.append(name)
        return real_load(self, name, tensor)
    monkeypatch.setattr(WeightMap, "load", load)
    return written


def test_update_weights_interrupted_anywhere_holds_old_or_new(ckpt, ckpt_b, monkeypatch):
    """Ctrl-C at any point of an update: the engine then scores exactly as a fresh engine
    with the old weights or one with the new, and its version says which."""
    import _thread
    import random
    import threading
    import time
    from safetensors.torch import load_file
    (path_a, _), (path_b, _) = ckpt, ckpt_b
    seqs = grpo_workload(40, groups=2, group_size=3)
    states = [load_file(path_a / "model.safetensors"), load_file(path_b / "model.safetensors")]
    fresh = []
    for path in (path_a, path_b):
        with Engine(path, page_size=4, kv_cache_tokens=512) as e:
            fresh.append(e.compute_log_probs(seqs)["log_probs"])
    rng = random.Random(41)
    with Engine(path_a, page_size=4, kv_cache_tokens=512) as engine:
        holds, interrupted = 0, 0
        for trial in range(12):
            engine.compute_log_probs(seqs)  # fills the prefix cache with the held weights
            version = engine.stats()["weight_version"]
            target = 1 - holds
            with monkeypatch.context() as m:
                if trial % 2:  # a real timer: the signal lands wherever it lands
                    timer = threading.Timer(rng.uniform(0, 0.004), _thread.interrupt_main)
                else:  # exactly before a random tensor's write
                    timer = None
                    weight_interrupts(m, rng.randrange(len(states[target])),
                                      _thread.interrupt_main)
                try:
                    if timer:
                        timer.start()
                    engine.update_weights(states[target])
                    if timer:
                        timer.join()
                        time.sleep(0.01)
                except KeyboardInterrupt:
                    interrupted += 1
            if engine.stats()["weight_version"] == version + 1:
                holds = target
            else:
                assert engine.stats()["weight_version"] == version
            assert engine.compute_log_probs(seqs)["log_probs"] == fresh[holds]
            no_leaks(engine)
        assert interrupted >= 6


def test_failed_write_refuses_to_score_until_repaired(ckpt, ckpt_b, monkeypatch):
    from safetensors.torch import load_file
    (path_a, _), (path_b, _) = ckpt, ckpt_b
    seqs = grpo_workload(42, groups=2, group_size=3)
    new = load_file(path_b / "model.safetensors")
    with Engine(path_b, page_size=4, kv_cache_tokens=512) as e:
        want = e.compute_log_probs(seqs)["log_probs"]
    with Engine(path_a, page_size=4, kv_cache_tokens=512) as engine:
        engine.compute_log_probs(seqs)
        with monkeypatch.context() as m:
            def lost():
                raise RuntimeError("device lost")
            written = weight_interrupts(m, 5, lost)
            with pytest.raises(RuntimeError, match="device lost"):
                engine.update_weights(new)
        assert len(written) == 5
        stats = engine.stats()
        assert stats["weight_version"] == 1 and stats["cached_pages"] == 0
        with pytest.raises(RuntimeError, match="failed part-way"):
            engine.compute_log_probs(seqs)
        with pytest.raises(RuntimeError, match="failed part-way"):
            engine.validate(seqs)
        # an update of some of the torn parameters is not enough
        engine.update_weights({"model.norm.weight": new["model.norm.weight"]})
        with pytest.raises(RuntimeError, match="failed part-way"):
            engine.compute_log_probs(seqs)
        engine.update_weights(new)
        assert engine.compute_log_probs(seqs)["log_probs"] == want
        no_leaks(engine)


def test_update_weights_rejects_non_finite_values(ckpt):
    path, _ = ckpt
    seqs = [{"prompt_token_ids": [1, 2, 3, 4, 5], "completion_token_ids": [6, 7, 8]}]
    with Engine(path, kv_cache_tokens=256) as engine:
        before = engine.compute_log_probs(seqs)["log_probs"]
        weight = engine.shard.model.model.layers[1].mlp.down_proj.weight
        for bad in (math.nan, math.inf, -math.inf):
            w = torch.randn(weight.shape)
            w[int(torch.randint(0, w.shape[0], ())), 3] = bad
            with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight"):
                engine.update_weights({"model.norm.weight": torch.ones(32),
                                       "model.layers.1.mlp.down_proj.weight": w})
            assert engine.stats()["weight_version"] == 0
            assert engine.compute_log_probs(seqs)["log_probs"] == before
        # the opt-out takes the caller's word for it
        engine.update_weights({"model.layers.1.mlp.down_proj.weight": w}, check_finite=False)
        assert engine.stats()["weight_version"] == 1


def test_threads_share_one_engine(ckpt):
    """Calls from several threads serialise: every result is exact, nothing leaks."""
    import threading
    path, hf = ckpt
    workloads = [grpo_workload(50 + i, groups=2, group_size=3) for i in range(4)]
    refs = [hf_scores(hf, w)[0] for w in workloads]
    errors: list = []
    with Engine(path, page_size=4, max_batch_tokens=16, kv_cache_tokens=512) as engine:
        def work(i: int) -> None:
            try:
                for _ in range(3):
                    out = engine.compute_log_probs(workloads[i])["log_probs"]
                    assert max_abs_diff(out, refs[i]) <= TOL
                    engine.stats()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert engine.stats()["running"] == engine.stats()["waiting"] == 0
        no_leaks(engine)


def test_scheduler_without_a_batch_is_an_error_not_an_assert(ckpt):
    path, hf = ckpt
    seqs = grpo_workload(43, groups=1, group_size=3)
    ref_lp, _ = hf_scores(hf, seqs)
    with Engine(path, page_size=4, max_batch_tokens=16, kv_cache_tokens=256) as engine:
        real = engine.shard.scheduler

        class Stalling:
            def __getattr__(self, name):
                return getattr(real, name)

            def schedule(self):
                return None
        engine.shard.scheduler = Stalling()
        with pytest.raises(RuntimeError, match="made no batch"):
            engine.compute_log_probs(seqs)
        engine.shard.scheduler = real
        assert_recovered(engine, seqs, ref_lp)


def test_tiny_temperatures_rejected_and_smallest_allowed_is_finite(ckpt):
    path, _ = ckpt
    seqs = grpo_workload(44, groups=1, group_size=2)
    with Engine(path, kv_cache_tokens=256) as engine:
        for t in (1e-39, 3e-39, 1e-7):
            with pytest.raises(ValueError, match="temperature must be finite and >= 1e-06"):
                engine.compute_log_probs(seqs, t)
        out = engine.compute_log_probs(seqs, 1e-6, return_entropy=True)
        assert all(not math.isnan(x) for row in out["log_probs"] + out["entropy"] for x in row)
        assert engine.stats()["scored_tokens"] == sum(map(len, out["log_probs"]))


def test_validate_names_sequence_and_field_and_changes_nothing(ckpt):
    import numpy as np
    from tokenspeed.inputs import InvalidSequenceError
    path, hf = ckpt
    good = {"prompt_token_ids": [3, 1, 4], "completion_token_ids": [1, 5]}
    with Engine(path, kv_cache_tokens=256) as engine:
        engine.validate([good, good])
        bad = {"prompt_token_ids": [3, 1, 4], "completion_token_ids": [1, VOCAB + 4]}
        with pytest.raises(InvalidSequenceError) as info:
            engine.validate([good, good, bad])
        assert (info.value.index, info.value.field) == (2, "completion_token_ids")
        assert info.value.detail == f"completion_token_ids[1] is {VOCAB + 4}, vocabulary is " \
                                    f"[0, {VOCAB})"
        with pytest.raises(TypeError):  # also a TypeError for type errors' catchers
            engine.validate([{"prompt_token_ids": "x", "completion_token_ids": []}])
        assert engine.stats()["scored_tokens"] == 0
        # 0-d integer tensors and numpy integers are ids; 0-d float tensors are not
        mixed = {"prompt_token_ids": [torch.tensor(3), np.int64(1), 4],
                 "completion_token_ids": [1, torch.tensor(5, dtype=torch.int32)]}
        assert engine.compute_log_probs([mixed])["log_probs"] == \
            engine.compute_log_probs([good])["log_probs"]
        with pytest.raises(InvalidSequenceError, match=r"prompt_token_ids\[0\] is tensor\(3\.\)"):
            engine.validate([{"prompt_token_ids": [torch.tensor(3.0)],
                              "completion_token_ids": [1]}])


def test_shared_field_objects_score_as_copies_and_fail_where_first_used(ckpt):
    """A list object used by several sequences (a GRPO group's prompt) is checked once:
    the scores equal those of separate copies, and a bad shared list is reported at the
    first sequence and field that holds it, with nothing scored."""
    from tokenspeed.inputs import InvalidSequenceError
    path, hf = ckpt
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    prompt = torch.randint(0, VOCAB, (7,), generator=g).tolist()
    comps = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 1, 4)]
    shared = [{"prompt_token_ids": prompt, "completion_token_ids": c} for c in comps]
    # the same object as a completion and, later, as a prompt
    shared.append({"prompt_token_ids": comps[0], "completion_token_ids": prompt})
    copies = [{k: list(v) for k, v in s.items()} for s in shared]
    ref_lp, _ = hf_scores(hf, copies)
    with Engine(path, kv_cache_tokens=256) as engine:
        got = engine.compute_log_probs(shared)["log_probs"]
        assert got == engine.compute_log_probs(copies)["log_probs"]
        assert max_abs_diff(got, ref_lp) <= TOL
        bad = prompt[:3] + [VOCAB] + prompt[3:]
        seqs = [copies[0]] + [{"prompt_token_ids": bad, "completion_token_ids": c}
                              for c in comps]
        with pytest.raises(InvalidSequenceError) as info:
            engine.compute_log_probs(seqs)
        assert (info.value.index, info.value.field) == (1, "prompt_token_ids")
        assert info.value.detail == f"prompt_token_ids[3] is {VOCAB}, vocabulary is [0, {VOCAB})"
        no_leaks(engine)
        assert engine.compute_log_probs(copies)["log_probs"] == got


def test_builtin_model_creation_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    import tokenspeed.builtin as builtin
    monkeypatch.setenv("TOKENSPEED_CACHE", str(tmp_path))
    for exc in (OSError("disk full"), KeyboardInterrupt()):
        def failing_save(*args, **kwargs):
            raise exc
        monkeypatch.setattr(builtin, "save_file", failing_save)
        with pytest.raises(type(exc)):
            builtin.builtin_model_dir()
        assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("TOKENSPEED_CACHE", str(tmp_path))
    assert (builtin.builtin_model_dir() / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [builtin.cache_dir().name]


@pytest.mark.gpu
def test_pool_sized_from_a_measured_batch(tmp_path):
    """Without kv_cache_tokens the CUDA pool takes what is left of 85% of the free memory
    after one measured max_batch_tokens batch: it fits beside such a batch, and the
    batch it was measured on runs."""
    path = make_checkpoint(tmp_path, "Qwen3ForCausalLM", vocab=VOCAB, seed=14)
    free_before, _ = torch.cuda.mem_get_info()
    with Engine(path, device="cuda", dtype="bfloat16", max_batch_tokens=2048) as engine:
        stats = engine.stats()
        per_token = engine.shard.kv_cache.k[0][0, 0].numel() * 2 * 2 * len(engine.shard.kv_cache.k)
        assert 0 < stats["kv_cache_tokens"] * per_token < 0.85 * free_before
        seqs = [{"prompt_token_ids": [1 + i % 90] * 400, "completion_token_ids": [2] * 111}
                for i in range(4)]
        out = engine.compute_log_probs(seqs)
        assert [len(x) for x in out["log_probs"]] == [111] * 4
        assert all(math.isfinite(x) for row in out["log_probs"] for x in row)


def test_every_stats_key_is_documented(ckpt):
    path, _ = ckpt
    with Engine(path, kv_cache_tokens=64) as engine:
        keys = engine.stats()
    undocumented = [k for k in keys if f"``{k}``" not in Engine.stats.__doc__]
    assert not undocumented
    assert Engine.close.__doc__ and Engine.validate.__doc__



class RecordingScheduler:
    """The engine's scheduler, recording the request ids of each completed batch and
    calling ``on_complete(batch count)`` before each completion."""

    def __init__(self, real, on_complete):
        self.real, self.on_complete, self.batches = real, on_complete, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def complete(self, batch):
        self.batches.append({e.request_id for e in batch.entries})
        self.on_complete(len(self.batches))
        return self.real.complete(batch)


def test_cancelled_after_the_last_batch(ckpt):
    """Sequences cancelled once every batch ran (the call is settling) come back NaN like
    any cancelled one, and the engine does not count them as scored."""
    path, hf = ckpt
    seqs = grpo_workload(71, groups=2, group_size=3)
    ref_lp, _ = hf_scores(hf, seqs)
    gone = {1, len(seqs) - 1}
    settings = dict(page_size=4, max_batch_tokens=16, kv_cache_tokens=512)
    with Engine(path, **settings) as engine:
        real = engine.shard.scheduler
        engine.shard.scheduler = recorder = RecordingScheduler(real, lambda n: None)
        engine.compute_log_probs(seqs)
        batches = len(recorder.batches)
    cancelled: set[int] = set()
    with Engine(path, **settings) as engine:
        real = engine.shard.scheduler
        engine.shard.scheduler = RecordingScheduler(
            real, lambda n: cancelled.update(gone) if n == batches else None)
        out = engine.compute_log_probs(seqs, cancelled=cancelled)
        engine.shard.scheduler = real
        for i, lp in enumerate(out["log_probs"]):
            if i in gone:
                assert all(math.isnan(x) for x in lp)
            else:
                assert max_abs_diff([lp], [ref_lp[i]]) <= TOL
        assert engine.stats()["scored_tokens"] == sum(
            len(lp) for i, lp in enumerate(out["log_probs"]) if i not in gone)
        no_leaks(engine)


@pytest.mark.parametrize("after_batch", [1, 3, 6])
def test_cancelled_sequences_drop_between_batches(ckpt, after_batch):
    """Sequences cancelled mid-call (as a server does for a client that went away) are
    scheduled no more, score NaN and free their pages; the others score as alone."""
    path, hf = ckpt
    seqs = grpo_workload(70, groups=3, group_size=4)
    ref_lp, _ = hf_scores(hf, seqs)
    gone = {5, 6, 7, len(seqs) - 6}
    # a fresh engine numbers the requests of sequences with a completion 0, 1, ...
    scored = [i for i, s in enumerate(seqs) if s["completion_token_ids"]]
    gone_ids = {scored.index(i) for i in gone}
    cancelled: set[int] = set()
    with Engine(path, page_size=4, max_batch_tokens=16, kv_cache_tokens=512) as engine:
        real = engine.shard.scheduler
        engine.shard.scheduler = recorder = RecordingScheduler(
            real, lambda n: cancelled.update(gone) if n == after_batch else None)
        out = engine.compute_log_probs(seqs, return_entropy=True, cancelled=cancelled)
        engine.shard.scheduler = real
        assert len(recorder.batches) > after_batch + 1
        for i, (lp, ent) in enumerate(zip(out["log_probs"], out["entropy"])):
            if i in gone:
                assert len(lp) == len(seqs[i]["completion_token_ids"])
                assert all(math.isnan(x) for x in lp + ent)
            else:
                assert max_abs_diff([lp], [ref_lp[i]]) <= TOL
        assert not any(ids & gone_ids for ids in recorder.batches[after_batch:])
        assert engine.stats()["scored_tokens"] == sum(
            len(lp) for i, lp in enumerate(out["log_probs"]) if i not in gone)
        assert engine.stats()["running"] == engine.stats()["waiting"] == 0
        no_leaks(engine)
        assert_recovered(engine, seqs, ref_lp)
