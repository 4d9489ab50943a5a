"""deterministic=True: a sequence's scores are bitwise the same whatever the call around it.

The property draws the company (other sequences, GRPO siblings sharing its prompt), the
order, max_batch_tokens (down to chunks far shorter than the sequence), the page size,
prefix-cache hits (a warm second pass) and a KV pool small enough to evict, and compares
the targets' scores with those of a fresh engine that scored them alone: exact equality.
Dense models and a mixture-of-experts one (Qwen2-MoE: router, grouped expert GEMMs,
shared expert and its gate), whose experts' row counts change with every draw, and whose
captured routing (the experts of every token, cached ones included) is compared too.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import make_checkpoint, random_sequences

from tokenspeed import Engine

pytest.importorskip("transformers")
VOCAB = 101


# the tiny Qwen3 (head dim 16) runs the simple attention kernel on CUDA; a Llama with
# head dim 128 runs the tensor-core ones (wgmma on an H200) in bf16
MODELS = {"qwen3": dict(arch="Qwen3ForCausalLM"),
          "llama-d128": dict(arch="LlamaForCausalLM", hidden=256, heads=2, kv_heads=1)}
# Qwen2-MoE, tiny (hidden 32: one K step of the tensor-core GEMM) and wider (hidden 256,
# head dim 128: several K steps, experts spanning several 128-row tiles on CUDA)
MOE_MODELS = {"qwen2-moe": dict(arch="Qwen2MoeForCausalLM"),
              "qwen2-moe-d128": dict(arch="Qwen2MoeForCausalLM", hidden=256, heads=2,
                                     kv_heads=1, moe=dict(moe_intermediate_size=160))}
MODELS.update(MOE_MODELS)
CASES = [pytest.param("cpu", "qwen3", id="cpu"),
         pytest.param("cuda", "qwen3", marks=pytest.mark.gpu, id="cuda"),
         pytest.param("cuda", "llama-d128", marks=pytest.mark.gpu, id="cuda-d128")]
MOE_CASES = [pytest.param("cpu", "qwen2-moe", id="cpu"),
             pytest.param("cuda", "qwen2-moe", marks=pytest.mark.gpu, id="cuda"),
             pytest.param("cuda", "qwen2-moe-d128", marks=pytest.mark.gpu, id="cuda-d128")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: make_checkpoint(tmp_path_factory.mktemp(name), vocab=VOCAB, seed=31, **kw)
            for name, kw in MODELS.items()}


def targets() -> list[dict]:
    """A GRPO group (one prompt, three completions) and an unrelated sequence."""
    gen = torch.Generator().manual_seed(32)
    prompt = torch.randint(0, VOCAB, (23,), generator=gen).tolist()
    group = [{"prompt_token_ids": prompt,
              "completion_token_ids": torch.randint(0, VOCAB, (5 + 3 * i,), generator=gen).tolist()}
             for i in range(3)]
    return group + random_sequences(gen, VOCAB, 1, max_prompt=30, max_completion=20)


# rich outputs, with filters that need a second pass over the logits (top-p without
# top-k) beside ones the candidates settle
RICH = dict(top_logprobs=3, top_p=0.9, min_p=0.02, token_ids=[0, 7, 50])
OUTPUTS = ("log_probs", "entropy", "top_logprobs", "token_ids_logprobs")


def options(rich: bool, moe: bool) -> dict:
    """The call's options: the rich outputs when drawn, the routing capture on MoE models."""
    return {**(RICH if rich else {}), **({"return_routed_experts": True} if moe else {})}


@functools.cache
def alone(path, device: str, dtype: str, rich: bool, moe: bool) -> list[dict]:
    """Each target scored alone, by a fresh engine with the default settings but for a
    bounded pool (by default a CUDA engine takes most of the free memory, which parallel
    test processes do not have; the pool's size is one of the things varied anyway)."""
    out = []
    for seq in targets():
        with Engine(path, device=device, dtype=dtype, deterministic=True,
                    kv_cache_tokens=1 << 16) as engine:
            out.append(engine.compute_log_probs([seq], 0.8, return_entropy=True,
                                                **options(rich, moe)))
    return out


DRAWS = dict(company_seed=st.integers(0, 2**16), n_company=st.integers(0, 6),
             max_batch_tokens=st.sampled_from([1, 3, 8, 17, 64, 512]),
             max_batch_requests=st.sampled_from([1, 2, 256]),
             page_size=st.sampled_from([1, 4, 16]), prefix=st.booleans(),
             small_pool=st.booleans(), rich=st.booleans(), data=st.data())
HYPOTHESIS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                        HealthCheck.too_slow])


@pytest.mark.parametrize("device, model", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@settings(max_examples=20, **HYPOTHESIS)
@given(**DRAWS)
def test_scores_are_bitwise_independent_of_the_call(checkpoints, device, model, dtype, **draws):
    check_bitwise(checkpoints[model], device, dtype, moe=False, **draws)


# fewer draws, and chunks of at least 3 tokens, to keep the CPU run short: a one-token
# chunk exercises the attention and GEMM paths that the dense property covers, and every
# draw still gives the experts other row counts
@pytest.mark.parametrize("device, model", MOE_CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@settings(max_examples=10, **HYPOTHESIS)
@given(**{**DRAWS, "max_batch_tokens": st.sampled_from([3, 8, 17, 64, 512])})
def test_moe_scores_are_bitwise_independent_of_the_call(checkpoints, device, model, dtype,
                                                        **draws):
    check_bitwise(checkpoints[model], device, dtype, moe=True, **draws)


def check_bitwise(ckpt, device, dtype, moe, company_seed, n_company, max_batch_tokens,
                  max_batch_requests, page_size, prefix, small_pool, rich, data):
    want = alone(ckpt, device, dtype, rich, moe)
    gen = torch.Generator().manual_seed(company_seed)
    company = random_sequences(gen, VOCAB, n_company, max_prompt=40, max_completion=30)
    mixed = targets() + company
    order = data.draw(st.permutations(range(len(mixed))))
    batch = [mixed[i] for i in order]
    longest = max(len(s["prompt_token_ids"]) + len(s["completion_token_ids"]) for s in batch)
    pool = -(-longest // page_size) * page_size + (16 if small_pool else 4096)
    with Engine(ckpt, device=device, dtype=dtype, deterministic=True, page_size=page_size,
                max_batch_tokens=max_batch_tokens, max_batch_requests=max_batch_requests,
                enable_prefix_cache=prefix, kv_cache_tokens=pool) as engine:
        for _ in range(2):  # the second pass hits the prefix cache when it is on
            out = engine.compute_log_probs(batch, 0.8, return_entropy=True,
                                           **options(rich, moe))
            keys = [*OUTPUTS[:4 if rich else 2], *(["routed_experts"] if moe else [])]
            for t, expected in enumerate(want):
                row = order.index(t)
                for key in keys:
                    assert out[key][row] == expected[key][0], (key, t, row)


# a part's own rich option, per sequence (a session without call-wide rich options
# takes parts with and without them, so a batch can hold both)
PER_SEQUENCE = {"top_k": dict(top_k=4), "top_p": dict(top_p=0.8),
                "token_ids": dict(token_ids=[3, 9])}


@pytest.mark.parametrize("device, model", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@settings(max_examples=8, **HYPOTHESIS)
@given(kind=st.sampled_from(sorted(PER_SEQUENCE)), rich_first=st.booleans(),
       max_batch_tokens=st.sampled_from([8, 64, 512]), company_seed=st.integers(0, 2**16))
def test_plain_part_is_bitwise_independent_of_rich_parts(checkpoints, device, model, dtype,
                                                          kind, rich_first, max_batch_tokens,
                                                          company_seed):
    """A session's plain part (no rich options) sharing batches with a part that asks a
    filter or ids per sequence scores as the targets alone: the head takes the plain
    rows' scores as on the plain path, not from the rich batch's logits."""
    want = alone(checkpoints[model], device, dtype, False, False)
    gen = torch.Generator().manual_seed(company_seed)
    rich = [{**seq, **PER_SEQUENCE[kind]}
            for seq in random_sequences(gen, VOCAB, 3, max_prompt=40, max_completion=30)]
    with Engine(checkpoints[model], device=device, dtype=dtype, deterministic=True,
                max_batch_tokens=max_batch_tokens, kv_cache_tokens=1 << 12) as engine:
        with engine.session(0.8, return_entropy=True) as session:
            if rich_first:
                others = session.add(rich)
            plain = session.add(targets())
            if not rich_first:
                others = session.add(rich)
            while not (plain.done and others.done):
                session.step()
            out = plain.result()
    for t, expected in enumerate(want):
        for key in OUTPUTS[:2]:
            assert out[key][t] == expected[key][0], (key, t)


@pytest.mark.parametrize("device, model", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@settings(max_examples=6, **HYPOTHESIS)
@given(kind=st.sampled_from(sorted(PER_SEQUENCE)), data=st.data(),
       max_batch_tokens=st.sampled_from([8, 64, 512]), company_seed=st.integers(0, 2**16))
def test_plain_sequences_are_bitwise_independent_of_rich_ones_in_the_call(
        checkpoints, device, model, dtype, kind, data, max_batch_tokens, company_seed):
    """Sequences that ask nothing of their own, in one call with sequences that ask a
    filter or ids, score as alone (the requested ids, an output of the whole call, aside)."""
    want = alone(checkpoints[model], device, dtype, False, False)
    gen = torch.Generator().manual_seed(company_seed)
    rich = [{**seq, **PER_SEQUENCE[kind]}
            for seq in random_sequences(gen, VOCAB, 3, max_prompt=40, max_completion=30)]
    mixed = targets() + rich
    order = data.draw(st.permutations(range(len(mixed))))
    with Engine(checkpoints[model], device=device, dtype=dtype, deterministic=True,
                max_batch_tokens=max_batch_tokens, kv_cache_tokens=1 << 12) as engine:
        out = engine.compute_log_probs([mixed[i] for i in order], 0.8, return_entropy=True)
    for t, expected in enumerate(want):
        for key in OUTPUTS[:2]:
            assert out[key][order.index(t)] == expected[key][0], (key, t)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tp2_merged_session_part_scores_as_its_own_call(checkpoints, dtype):
    """Under tensor parallelism a session merges its parts into one call per step: a part
    that asks nothing beyond log-probs, merged with one asking ids and a filter per
    sequence, returns exactly what its own call returns (values and keys)."""
    ckpt = checkpoints["qwen3"]
    gen = torch.Generator().manual_seed(9)
    rich = [{**seq, "token_ids": [1, 5], "top_k": 3}
            for seq in random_sequences(gen, VOCAB, 2, max_prompt=30, max_completion=20)]
    with Engine(ckpt, device="cpu", dtype=dtype, deterministic=True, tp_size=2,
                max_batch_tokens=17) as engine:
        own = engine.compute_log_probs(targets(), 0.8, return_entropy=True)
        with engine.session(0.8, return_entropy=True) as session:
            others = session.add(rich)
            plain = session.add(targets())
            while not (plain.done and others.done):
                session.step()
            assert plain.result() == own
            assert "token_ids_logprobs" in others.result()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tp2_scores_are_bitwise_independent_of_the_call(checkpoints, dtype):
    """Under tensor parallelism (two CPU ranks on gloo, launched by the engine): every
    rank's part of a row is computed on fixed blocks and the ranks' sums (row-parallel
    layers, the experts, the head's partials) are added in rank order, so the targets
    score the same alone and inside a reversed, chunked, cached call. The MoE model
    covers the dense layers too (attention, shared expert)."""
    ckpt = checkpoints["qwen2-moe"]
    gen = torch.Generator().manual_seed(5)
    company = random_sequences(gen, VOCAB, 5, max_prompt=40, max_completion=30)
    want = []
    with Engine(ckpt, device="cpu", dtype=dtype, deterministic=True, tp_size=2) as engine:
        for seq in targets():
            engine.flush_cache()
            want.append(engine.compute_log_probs([seq], 0.8, return_entropy=True,
                                                 **options(True, True)))
    mixed = list(reversed(targets() + company))
    with Engine(ckpt, device="cpu", dtype=dtype, deterministic=True, tp_size=2,
                max_batch_tokens=17, page_size=4) as engine:
        for _ in range(2):  # the second pass hits the prefix cache
            out = engine.compute_log_probs(mixed, 0.8, return_entropy=True,
                                           **options(True, True))
            for t, expected in enumerate(want):
                row = len(mixed) - 1 - t
                for key in (*OUTPUTS, "routed_experts"):
                    assert out[key][row] == expected[key][0], (key, t)
