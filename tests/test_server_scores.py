"""Scores that JSON does not hold plainly, over HTTP in process (CPU): -inf (tokens the
sampler filters drop, top_logprobs slots past the vocabulary) comes back as -Infinity and
reads back as -inf through ScoringClient's parser; a NaN score fails the request."""
from __future__ import annotations

import asyncio
import json
import math

import pytest
from model_factory import make_checkpoint

from tokenspeed import Engine

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from server_testing import serving  # noqa: E402

from tokenspeed.session import Part  # noqa: E402

VOCAB = 97


def _post(app, body: dict) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post("/v1/score", json=body)
    return asyncio.run(go())


@pytest.fixture
def served(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt", "Qwen3ForCausalLM", vocab=VOCAB, seed=5)
    engine = Engine(path, device="cpu", dtype="float32")
    with serving(engine, path) as (service, app):
        yield engine, service, app


def test_filtered_scores_come_back_as_minus_infinity(served):
    engine, _, app = served
    seqs = [{"prompt_token_ids": [3, 14, 15, 92], "completion_token_ids": list(range(20, 60))}]
    options = {"top_k": 2, "top_logprobs": 3}
    direct = engine.compute_log_probs(seqs, **options)
    assert any(math.isinf(x) for x in direct["log_probs"][0])  # top_k=2 drops most tokens
    response = _post(app, {"sequences": seqs, **options})
    assert response.status_code == 200, response.text
    assert "-Infinity" in response.text
    got = response.json()  # the parser ScoringClient uses
    assert json.dumps(got, sort_keys=True) == json.dumps(direct, sort_keys=True)


def test_nan_score_fails_the_request(served, monkeypatch):
    engine, service, app = served
    seqs = [{"prompt_token_ids": [3, 14], "completion_token_ids": [15, 92]}]
    real = Part.result

    def nan_scores(part):
        out = real(part)
        out["log_probs"][0][1] = math.nan
        return out
    monkeypatch.setattr(Part, "result", nan_scores)
    response = _post(app, {"sequences": seqs})
    assert response.status_code == 500
    assert "NaN" in response.json()["error"]
    monkeypatch.undo()
    assert _post(app, {"sequences": seqs}).status_code == 200  # the service goes on
