"""The server's shared engine sessions in deterministic mode, in process (CPU): requests
scored in one session, sharing its batches, get back, bit for bit, what a direct call of
the same engine on each request alone returns. (In the default mode batch company moves
the last bits, tests/test_server.py allows COMPANY_TOL for it.)"""
from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import pytest
from model_factory import make_checkpoint

from tokenspeed import Engine

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from server_testing import serving  # noqa: E402

from tokenspeed.server.scoring import ScoringService  # noqa: E402

VOCAB = 97
OPTIONS = ({}, {"temperature": 0.7, "return_entropy": True})


def random_request(rng: random.Random) -> list[dict]:
    return [{"prompt_token_ids": [rng.randrange(VOCAB) for _ in range(rng.randint(1, 60))],
             "completion_token_ids": [rng.randrange(VOCAB) for _ in range(rng.randint(0, 60))]}
            for _ in range(rng.randint(1, 4))]


async def _score_merged(service: ScoringService, app, requests: list[tuple[list, dict]]
                        ) -> list[str]:
    """Every request queued behind a blocked engine thread, so each group of equal options
    becomes one engine session; returns the response bodies."""
    gate = threading.Event()
    blocker = service.submit_op(lambda engine: gate.wait(60))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        posts = [asyncio.ensure_future(http.post("/v1/score", json={"sequences": seqs, **opts}))
                 for seqs, opts in requests]
        deadline = time.monotonic() + 60
        while service.metrics.registry.get_sample_value("tokenspeed_queue_depth") \
                < len(requests):
            assert time.monotonic() < deadline, "the requests were not queued"
            await asyncio.sleep(0.01)
        gate.set()
        await blocker.future
        responses = await asyncio.gather(*posts)
    assert [r.status_code for r in responses] == [200] * len(requests), \
        [r.text for r in responses]
    return [r.text for r in responses]


def test_merged_requests_equal_direct_calls_bitwise_when_deterministic(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt", "Qwen3ForCausalLM", vocab=VOCAB, seed=5)
    # small batches: a session spans several, each request alone fewer, so the
    # GEMMs see other shapes and prefills split elsewhere
    engine = Engine(path, device="cpu", dtype="float32", max_batch_tokens=256,
                    deterministic=True)
    rng = random.Random(7)
    requests = [(random_request(rng), OPTIONS[i % 2]) for i in range(12)]
    with serving(engine, path) as (service, app):  # stopping closes the engine
        bodies = asyncio.run(_score_merged(service, app, requests))
        # one engine session per option group, holding all of its requests
        registry = service.metrics.registry
        assert registry.get_sample_value("tokenspeed_batch_requests_count") == 2
        assert registry.get_sample_value("tokenspeed_batch_requests_sum") == 12
        for (seqs, opts), body in zip(requests, bodies):
            engine.flush_cache()  # alone: nothing of the session is reused
            direct = engine.compute_log_probs(seqs, **opts)
            # JSON writes each float's shortest repr, which reads back to the same bits
            # (-0.0 included), so equal text is bitwise equality
            assert json.dumps(json.loads(body), sort_keys=True) == \
                json.dumps(direct, sort_keys=True)


def test_deterministic_flag_reaches_the_engine_of_serve_and_score(tmp_path):
    from tokenspeed import cli
    path = make_checkpoint(tmp_path / "ckpt", "Qwen3ForCausalLM", vocab=VOCAB, seed=5)
    for command in (["serve"], ["score", "-"]):
        for flags in ([], ["--deterministic"]):
            args = cli._parser().parse_args([*command, "--device", "cpu", *flags])
            with cli._load_engine(path, args) as engine:
                assert engine.config.deterministic is bool(flags), (command, flags)
