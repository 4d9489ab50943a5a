"""`tokenspeed serve` as a real process on a free localhost port (CPU, built-in model),
spoken to over real HTTP.

Exactness: on the CPU a sequence's scores may change in the last bits with its batch
company (the GEMMs' blocking depends on the batch's token count; chunk boundaries move
too), so a request that shares batches with others is compared with a direct call of it
alone to COMPANY_TOL (tokens and lengths exactly), and a request that runs alone (one
client) must equal the direct call bit for bit; with --deterministic every response must.

Timing: a batch of MAX_BATCH_TOKENS takes seconds here, so "while a long request runs"
is observed from the server's own counters (a request admitted into the running session,
queue depth), never from a sleep.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from tokenspeed import Engine
from tokenspeed.builtin import CONFIG, builtin_weights
from tokenspeed.client import ScoringClient
from tokenspeed.inputs import InvalidSequenceError

pytestmark = pytest.mark.slow  # every test talks to a server process
ROOT = Path(__file__).resolve().parents[1]
KEY = "s3cret"
VOCAB = CONFIG["vocab_size"]
MAX_BATCH_TOKENS = 65536
MAX_REQUEST_BYTES = 2_000_000
COMPANY_TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `tokenspeed serve` process; stop() sends SIGTERM and returns its exit status."""

    def __init__(self, cache: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TOKENSPEED_CACHE": str(cache),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenspeed", "serve", "--device", "cpu", "--port",
             str(self.port), "--max-batch-tokens", str(MAX_BATCH_TOKENS), *flags],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        headers = {"Authorization": f"Bearer {KEY}"} if KEY in flags else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=120)
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                if self.http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)

    def busy(self) -> bool:
        """A request is admitted and not yet scored."""
        return self.metric("tokenspeed_running_requests") > 0

    def admitted(self, session: str) -> float:
        """Requests admitted as a session opened ("new") or into a running one."""
        return self.metric(f'tokenspeed_admitted_requests_total{{session="{session}"}}')

    def stats(self) -> dict:
        return self.http.get("/v1/model").json()["stats"]

    def metric(self, name: str) -> float:
        text = self.http.get("/metrics").text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def terminate(self) -> None:
        self.terminated = True
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """SIGTERM (once: a second one during shutdown kills), then the exit status."""
        self.http.close()
        if not getattr(self, "terminated", False):
            self.terminate()
        self.stdout, self.stderr = self.proc.communicate(timeout=120)
        return self.proc.returncode


def wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def assert_idle(server: Server) -> None:
    """No request left in the engine, every page free or cached."""
    s = server.stats()
    assert s["running"] == s["waiting"] == s["owned_pages"] == 0, s
    assert s["free_pages"] + s["cached_pages"] == s["total_pages"], s


def scored(engine, seqs, **options) -> dict:
    """A direct call's result without its weight_version (the server's is checked apart:
    the direct engine's version counts its own updates)."""
    out = engine.compute_log_probs(seqs, **options)
    out.pop("weight_version")
    return out


def assert_close(out: dict, direct: dict) -> None:
    """A response of a request that shared engine calls, against a direct call alone."""
    assert out.keys() == direct.keys() and out["tokens"] == direct["tokens"]
    for key in direct.keys() - {"tokens"}:
        for got, want in zip(out[key], direct[key], strict=True):
            assert len(got) == len(want)
            assert all(abs(a - b) <= COMPANY_TOL for a, b in zip(got, want)), key


def random_request(rng: random.Random, max_len: int = 40) -> list[dict]:
    return [{"prompt_token_ids": [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_len))],
             "completion_token_ids": [rng.randrange(VOCAB)
                                      for _ in range(rng.randint(0, max_len))]}
            for _ in range(rng.randint(1, 4))]


def long_request(seed: int, n: int, length: int = 1000) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, VOCAB, (length // 2,), generator=g).tolist(),
             "completion_token_ids": torch.randint(0, VOCAB, (length // 2,),
                                                   generator=g).tolist()}
            for _ in range(n)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def server(cache):
    srv = Server(cache, "--api-key", KEY, "--max-request-bytes", str(MAX_REQUEST_BYTES))
    yield srv
    assert srv.stop() == 0, srv.stderr
    assert "Traceback" not in srv.stderr, srv.stderr


@pytest.fixture(scope="module")
def engine(server):
    """The engine a user would build in-process on the same checkpoint and settings."""
    with Engine(server.http.get("/v1/model").json()["model_path"], device="cpu",
                max_batch_tokens=MAX_BATCH_TOKENS) as e:
        yield e


@pytest.fixture
def client(server):
    with ScoringClient(server.url, api_key=KEY) as c:
        yield c


def test_scores_equal_compute_log_probs_bitwise(server, engine, client):
    rng = random.Random(1)
    seqs = random_request(rng) + [{"prompt_token_ids": [5], "completion_token_ids": []}]
    for options in ({}, {"temperature": 0.7, "return_entropy": True}):
        out = client.score(seqs, **options)
        direct = scored(engine, seqs, **options)
        assert out.pop("weight_version") == 0
        assert out == direct
    # ids as tensors and numpy-style integers, tensors back, as the engine does them
    as_tensors = [{"prompt_token_ids": torch.tensor(s["prompt_token_ids"]),
                   "completion_token_ids": torch.tensor(s["completion_token_ids"])}
                  for s in seqs]
    out = client.score(as_tensors, return_entropy=True, return_tensors=True)
    direct = scored(engine, seqs, return_entropy=True, return_tensors=True)
    for key, value in direct.items():
        assert torch.equal(out[key], value), key
    model = client.model()
    assert (model["architecture"], model["vocab_size"], model["dtype"], model["tp_size"]) == \
        ("LlamaForCausalLM", VOCAB, "float32", 1)
    assert_idle(server)


def test_concurrent_clients_each_get_exactly_their_own(server, engine):
    merged_before = (server.metric("tokenspeed_batch_requests_sum")
                     - server.metric("tokenspeed_batch_requests_count"))
    tokens_before = server.metric("tokenspeed_scored_tokens_total")
    rngs = [random.Random(100 + i) for i in range(32)]
    work = [[(random_request(rng), rng.choice([{}, {"temperature": 0.5},
                                               {"return_entropy": True}]))
             for _ in range(4)] for rng in rngs]
    results: list[list] = [[] for _ in work]
    errors: list = []
    start = threading.Barrier(len(work))

    def client_thread(i: int) -> None:
        try:
            with ScoringClient(server.url, api_key=KEY) as c:
                start.wait()
                for seqs, options in work[i]:
                    results[i].append(c.score(seqs, **options))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    tokens = 0
    for requests, outs in zip(work, results):
        for (seqs, options), out in zip(requests, outs):
            assert out.pop("weight_version") == 0
            assert_close(out, scored(engine, seqs, **options))
            tokens += sum(len(s["completion_token_ids"]) for s in seqs)
    assert server.metric("tokenspeed_scored_tokens_total") - tokens_before == tokens
    # requests from different clients shared engine calls
    assert (server.metric("tokenspeed_batch_requests_sum")
            - server.metric("tokenspeed_batch_requests_count")) > merged_before
    assert_idle(server)


def test_bad_requests_get_400_413_401_and_score_nothing(server, engine):
    http = server.http
    scored = server.stats()["scored_tokens"]
    bad = [{"prompt_token_ids": [1, 2], "completion_token_ids": [3]},
           {"prompt_token_ids": [1], "completion_token_ids": [4, VOCAB + 3]}]
    with pytest.raises(InvalidSequenceError) as direct:
        engine.validate(bad)
    r = http.post("/v1/score", json={"sequences": bad})
    assert r.status_code == 400
    assert r.json() == {"error": str(direct.value), "index": 1, "field": "completion_token_ids",
                        "detail": direct.value.detail}
    with ScoringClient(server.url, api_key=KEY) as c, \
            pytest.raises(InvalidSequenceError, match=re.escape(str(direct.value))) as e:
        c.score(bad)
    assert (e.value.index, e.value.field) == (1, "completion_token_ids")
    cases = [
        (b'{"sequences": [', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"sequences": [], "temperature": NaN}', "NaN is not a JSON number"),
        (b'{"sequences": [], "temperature": 0}', "temperature must be finite and >= 1e-06"),
        (b'{"temperature": 1.0}', "missing key 'sequences'"),
        (b'{"sequences": [{"prompt_token_ids": [1]}]}', "sequence 0: missing key"),
        (b'{"sequences": [], "no_such_option": 1}', "no_such_option"),
        (b'{"sequences": [], "return_tensors": true}', "'return_tensors' is not available"),
        (b'{"sequences": [{"prompt": "hi", "completion": "x"}]}', "has no tokenizer"),
    ]
    for body, message in cases:
        r = http.post("/v1/score", content=body)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)
    big = json.dumps({"sequences": [{"prompt_token_ids": [1] * MAX_REQUEST_BYTES,
                                     "completion_token_ids": [2]}]}).encode()
    assert http.post("/v1/score", content=big).status_code == 413
    # a chunked body declares no length: it is cut off once it passes the limit
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
    assert http.post("/v1/score", content=chunks).status_code == 413
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path in ("/health", "/metrics", "/v1/model"):
            assert httpx.get(server.url + path, headers=headers).status_code == 401
        assert httpx.post(server.url + "/v1/score", headers=headers,
                          json={"sequences": []}).status_code == 401
    assert server.stats()["scored_tokens"] == scored
    assert server.metric('tokenspeed_http_requests_total{path="/v1/score",status="413"}') == 2
    assert_idle(server)


def send_and_hang_up(url: str, body: dict, after: threading.Event) -> None:
    """Send a whole request on a raw socket, then close it without reading the answer
    once ``after`` is set."""
    port = int(url.rsplit(":", 1)[1])
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                  b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        after.wait()


def test_request_joins_the_running_session_and_is_answered_first(server, engine):
    """A small request that arrives while a long one runs is admitted into its session
    between batches (not after it drains), and answered as soon as its own sequences are
    scored: before a long request admitted after it, which still has batches to run."""
    first, late = long_request(7, 80), long_request(8, 80)
    small = random_request(random.Random(9))
    running = server.admitted("running")
    out: dict[str, dict] = {}

    def score(name: str, seqs: list[dict]) -> None:
        with ScoringClient(server.url, api_key=KEY) as c:
            out[name] = c.score(seqs)
    threads = {name: threading.Thread(target=score, args=(name, seqs))
               for name, seqs in (("first", first), ("small", small), ("late", late))}
    threads["first"].start()
    wait_until(server.busy)
    threads["small"].start()
    wait_until(lambda: server.admitted("running") == running + 1)
    threads["late"].start()
    wait_until(lambda: server.admitted("running") == running + 2)
    threads["small"].join()
    # first come, first served: the late request's 80k tokens are behind the small one's,
    # so it has at least one batch (seconds here) left when the small one is answered
    assert "late" not in out
    for t in threads.values():
        t.join()
    assert out["small"].pop("weight_version") == 0
    assert_close(out["small"], scored(engine, small))
    for name, seqs in (("first", first), ("late", late)):
        assert out[name]["tokens"] == [s["completion_token_ids"] for s in seqs]
    assert_idle(server)


def test_client_gone_mid_session_drops_its_work_only(server, engine, client):
    """A client hangs up after its request joined a running session: its remaining work
    stops within a batch (far fewer of its pages computed than it asked for), its pages
    come back, the other requests' results are right."""
    blocker = long_request(1, 80)
    other = random_request(random.Random(2))
    gone = long_request(3, 300)  # 300k tokens: several batches of CPU work
    page = server.stats()["page_size"]

    def full_pages(seqs: list[dict]) -> int:
        return sum((len(s["prompt_token_ids"]) + len(s["completion_token_ids"])) // page
                   for s in seqs)
    running = server.admitted("running")
    inserted = server.stats()["inserted_pages"]
    hang_up = threading.Event()
    results: dict[str, dict] = {}
    blocker_thread = threading.Thread(
        target=lambda: results.update(blocker=client.score(blocker)))
    blocker_thread.start()
    wait_until(server.busy)
    gone_thread = threading.Thread(target=send_and_hang_up,
                                   args=(server.url, {"sequences": gone}, hang_up))
    gone_thread.start()
    wait_until(lambda: server.admitted("running") == running + 1)
    other_thread = threading.Thread(target=lambda: results.update(
        other=ScoringClient(server.url, api_key=KEY).score(other)))
    other_thread.start()
    wait_until(lambda: server.admitted("running") == running + 2)
    hang_up.set()
    for t in (gone_thread, other_thread, blocker_thread):
        t.join()
    wait_until(lambda: not server.busy())
    assert results["other"].pop("weight_version") == 0
    assert_close(results["other"], scored(engine, other))
    assert results["blocker"].pop("weight_version") == 0
    assert_close(results["blocker"], scored(engine, blocker))
    computed = server.stats()["inserted_pages"] - inserted
    assert computed < full_pages(blocker) + full_pages(other) + full_pages(gone) // 2
    assert server.metric('tokenspeed_http_requests_total{path="/v1/score",status="499"}') >= 1
    wait_until(lambda: server.stats()["running"] == 0)
    assert_idle(server)


def write_checkpoint(folder: Path, scale: float) -> Path:
    folder.mkdir()
    weights = {k: v * scale if k.endswith("proj.weight") else v
               for k, v in builtin_weights().items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def test_update_weights_mid_session_never_mixes(server, engine, client, tmp_path):
    """An update that arrives while a session runs stops admission: the requests admitted
    before it (the long one and one that joined it mid-session) finish on the old
    weights, then the update runs, then a later request scores alone on the new ones."""
    new_dir = write_checkpoint(tmp_path / "new", 1.5)
    builtin_dir = server.http.get("/v1/model").json()["model_path"]
    before = long_request(4, 120)
    joined = random_request(random.Random(10))
    after = random_request(random.Random(5))
    running, new = server.admitted("running"), server.admitted("new")
    out: dict[str, dict] = {}
    health: list[int] = []
    first = threading.Thread(target=lambda: out.update(before=client.score(before)))
    first.start()
    wait_until(server.busy)
    second = threading.Thread(target=lambda: out.update(
        joined=ScoringClient(server.url, api_key=KEY).score(joined)))
    second.start()
    wait_until(lambda: server.admitted("running") == running + 1)
    update = threading.Thread(target=lambda: out.update(
        version=ScoringClient(server.url, api_key=KEY).update_weights_from_disk(new_dir)))
    update.start()
    while update.is_alive():
        health.append(server.http.get("/health").status_code)
        if 503 in health and "after" not in out:
            out["after"] = ScoringClient(server.url, api_key=KEY).score(after)
    first.join()
    second.join()
    assert out["version"] == 1 and 503 in health
    assert server.http.get("/health").status_code == 200
    # nothing joined the running session after the update arrived; "after" opened its own
    assert server.admitted("running") == running + 1
    assert server.admitted("new") == new + 2
    for name, seqs in (("before", before), ("joined", joined)):
        assert out[name].pop("weight_version") == 0
        assert_close(out[name], scored(engine, seqs))
    with Engine(new_dir, device="cpu", max_batch_tokens=MAX_BATCH_TOKENS) as new_engine:
        assert out["after"].pop("weight_version") == 1
        assert out["after"] == scored(new_engine, after)
    # a bad checkpoint changes nothing
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        client.update_weights_from_disk(tmp_path / "missing")
    client.flush_cache()
    assert server.stats()["cached_pages"] == 0
    assert client.update_weights_from_disk(builtin_dir) == 2
    again = client.score(after)
    assert again.pop("weight_version") == 2 and again == scored(engine, after)
    assert_idle(server)


def test_32_concurrent_clients_bitwise_in_deterministic_mode(cache):
    """32 clients at once against a --deterministic server with small batches, their first
    requests arriving while a long request runs: they join its session and share batches
    with it and each other, and every response equals a direct call of its request alone
    bit for bit."""
    srv = Server(cache, "--deterministic", "--max-batch-tokens", "256")
    options = {"temperature": 0.7, "return_entropy": True}
    try:
        blocker = long_request(11, 30)  # 30k tokens: over a hundred batches of 256
        rngs = [random.Random(300 + i) for i in range(32)]
        work = [[random_request(rng) for _ in range(3)] for rng in rngs]
        results: list[list[str]] = [[] for _ in work]
        errors: list = []
        start = threading.Barrier(len(work) + 1)

        def post(http: httpx.Client, seqs: list[dict]) -> str:
            r = http.post("/v1/score", json={"sequences": seqs, **options})
            assert r.status_code == 200, r.text
            return r.text

        def client_thread(i: int) -> None:
            try:
                with httpx.Client(base_url=srv.url, timeout=120) as http:
                    start.wait()
                    for seqs in work[i]:
                        results[i].append(post(http, seqs))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(work))]
        for t in threads:
            t.start()
        out: dict[str, str] = {}

        def blocker_client() -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as http:
                out["blocker"] = post(http, blocker)
        blocker_thread = threading.Thread(target=blocker_client)
        blocker_thread.start()
        wait_until(srv.busy)
        start.wait()
        for t in threads + [blocker_thread]:
            t.join()
        assert not errors, errors
        assert srv.admitted("running") > 0
        model_dir = srv.http.get("/v1/model").json()["model_path"]
    finally:
        assert srv.stop() == 0, srv.stderr
    with Engine(model_dir, device="cpu", deterministic=True) as engine:
        for requests, bodies in [([blocker], [out["blocker"]]), *zip(work, results)]:
            for seqs, body in zip(requests, bodies):
                engine.flush_cache()
                direct = engine.compute_log_probs(seqs, **options)
                # JSON writes each float's shortest repr, which reads back to the same
                # bits, so equal text is bitwise equality
                assert json.dumps(json.loads(body), sort_keys=True) == \
                    json.dumps(direct, sort_keys=True)


def test_sigterm_finishes_in_flight_requests_and_exits_0(cache, tmp_path):
    srv = Server(cache)
    seqs = long_request(6, 30)
    out: dict = {}
    with ScoringClient(srv.url) as c:
        t = threading.Thread(target=lambda: out.update(r=c.score(seqs)))
        t.start()
        wait_until(srv.busy)
        srv.terminate()
        t.join()
        with pytest.raises(httpx.TransportError):  # no longer accepting
            time.sleep(0.5)
            httpx.get(srv.url + "/health")
    assert srv.stop() == 0, srv.stderr
    assert "Traceback" not in srv.stderr
    with Engine(Path(cache) / "builtin-v1", device="cpu",
                max_batch_tokens=MAX_BATCH_TOKENS) as engine:
        assert out["r"]["log_probs"] == engine.compute_log_probs(seqs)["log_probs"]


def test_text_sequences_with_a_tokenizer(cache, tmp_path):
    pytest.importorskip("transformers")
    from model_factory import make_checkpoint
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = make_checkpoint(tmp_path / "model", "LlamaForCausalLM", vocab=len(words))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(model)
    srv = Server(cache, str(model))
    try:
        with ScoringClient(srv.url) as c:
            text = c.score([{"prompt": "the cat sat", "completion": "on a mat"}])
            ids = c.score([{"prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 6, 5]}])
            assert text == ids and text["tokens"] == [[4, 6, 5]]
            with pytest.raises(InvalidSequenceError, match="completion must be a string") as e:
                c.score([{"prompt": "the", "completion": "cat"},
                         {"prompt": "the", "completion": [2]}])
            assert (e.value.index, e.value.field) == (1, "completion")
    finally:
        assert srv.stop() == 0, srv.stderr
