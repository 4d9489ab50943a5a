"""The HTTP API (FastAPI on uvicorn) over a ScoringService.

Handlers only parse, queue and await: every engine call runs on the service's thread,
and no JSON work does. A body is parsed on the event loop (in CPython a thread would
only take turns with it for the same lock); a scored part is turned into lists and JSON
in the threadpool, so a large response does not hold up the event loop. Errors are JSON
``{"error": message}`` (plus ``index`` and ``field`` for a bad sequence, as
InvalidSequenceError carries them).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..inputs import InvalidSequenceError
from ..models.loader import iterate_checkpoint
from .metrics import Metrics
from .scoring import RequestError, ScoringService, ShuttingDown

# options the engine takes that make no sense over HTTP: tensors cannot travel as JSON
# (ScoringClient pads locally instead), and the cancellation set is the server's own
RESERVED_OPTIONS = ("return_tensors", "cancelled")
# the status nginx gave a request whose client closed the connection first
CLIENT_GONE = 499


class HTTPError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.body = status, {"error": message, **extra}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"body of {declared} bytes exceeds --max-request-bytes {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # chunked bodies declare no length
            raise HTTPError(413, f"body exceeds --max-request-bytes {limit}")
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, f"body must be a JSON object, got {type(obj).__name__}")
    return obj


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return value != value
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_nan(v) for v in value)
    return False


def _encode_scores(result: dict[str, Any]) -> str:
    """A score result as JSON. -inf is a score (a token the sampler filters drop, a top
    log-prob slot past the vocabulary) and goes out as -Infinity, the extension of JSON
    that Python's json (and so ScoringClient) and many other parsers read; NaN means the
    model gave no distribution for a row (NaN or all -inf logits) and fails the request."""
    try:
        return json.dumps(result, allow_nan=False)  # the usual case, one pass
    except ValueError:
        pass
    if _has_nan(result):
        raise HTTPError(500, "the model gave a NaN score (NaN or all -inf logits in a row)")
    return json.dumps(result)


def _response(part: Any, metrics: Metrics) -> str:
    """A scored part as the response body: compute_log_probs's dict, as JSON."""
    result = part.result()
    content = _encode_scores(result)
    metrics.scored(result)
    return content


def _read_checkpoint(path: str) -> dict[str, Any]:
    try:
        return {name: t for _, name, t in iterate_checkpoint(path)}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the checkpoint in {path}: {e}") from None


def _error_of(e: BaseException) -> HTTPError:
    if isinstance(e, RequestError):
        cause = e.cause
        if isinstance(cause, InvalidSequenceError):
            return HTTPError(400, str(cause), index=cause.index, field=cause.field,
                             detail=cause.detail)
        return HTTPError(400, str(e))
    if isinstance(e, ShuttingDown):
        return HTTPError(503, str(e))
    return HTTPError(500, f"{type(e).__name__}: {e}")


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read: only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Guard:
    """ASGI middleware: the API key (every path) and the request counter. Pure ASGI, so
    handlers still see the client's disconnect."""

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.paths = {route.path for route in app.routes}
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            if self.expected is not None:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    response = JSONResponse({"error": "missing or wrong API key "
                                                      "(Authorization: Bearer KEY)"},
                                            status_code=401,
                                            headers={"WWW-Authenticate": "Bearer"})
                    return await response(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            # unknown paths share one label: a scanner must not grow the series without end
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()


def create_app(service: ScoringService, metrics: Metrics, *, api_key: str | None,
               max_request_bytes: int, model_dir: Path,
               to_token_ids: Callable[[list[Any]], list[Any]]) -> FastAPI:
    """``to_token_ids`` turns the text form of sequences into ids (a no-op on ids)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        # uvicorn has stopped accepting and finished every in-flight request
        await run_in_threadpool(service.stop)

    app = FastAPI(title="tokenspeed", lifespan=lifespan, openapi_url=None)

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, e: HTTPError) -> JSONResponse:
        return JSONResponse(e.body, status_code=e.status)

    def ready() -> None:
        if not service.ready:
            raise HTTPError(503, "the model is loading")

    async def settle(job) -> Any:
        try:
            return await job.future
        except Exception as e:  # noqa: BLE001 - worded for the client
            raise _error_of(e) from e

    def submit(submit_fn: Callable, *args: Any):
        try:
            return submit_fn(*args)
        except ShuttingDown as e:
            raise _error_of(e) from None

    updating = [0]  # weight updates received and not finished: /health says 503
    checkpoint_reader = ThreadPoolExecutor(1, thread_name_prefix="tokenspeed-checkpoint")

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        body = await _json_body(request, max_request_bytes)
        ready()
        start = time.perf_counter()
        if "sequences" not in body:
            raise HTTPError(400, "missing key 'sequences'")
        options = {k: v for k, v in body.items() if k != "sequences"}
        for key in RESERVED_OPTIONS:
            if key in options:
                raise HTTPError(400, f"option {key!r} is not available over HTTP")
        try:
            sequences = await run_in_threadpool(to_token_ids, body["sequences"])
        except InvalidSequenceError as e:
            raise HTTPError(400, str(e), index=e.index, field=e.field,
                            detail=e.detail) from None
        job = submit(service.submit_score, sequences, options)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():
            service.cancel(job)
            return Response(status_code=CLIENT_GONE)
        part = await settle(job)
        content = await run_in_threadpool(_response, part, metrics)
        metrics.latency.observe(time.perf_counter() - start)
        return Response(content, media_type="application/json")

    @app.post("/v1/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> dict[str, Any]:
        body = await _json_body(request, max_request_bytes)
        ready()
        path = body.get("model_path")
        if not isinstance(path, str):
            raise HTTPError(400, f"model_path must be a string, got {path!r:.80}")
        # Queued at once, so requests that arrive later score on the new weights; the
        # checkpoint is read meanwhile on another thread while earlier requests score.
        reading = checkpoint_reader.submit(_read_checkpoint, path)

        def update(engine):
            return engine.update_weights(reading.result())
        updating[0] += 1
        try:
            await settle(submit(service.submit_op, update))
        finally:
            updating[0] -= 1
        return {"weight_version": service.stats["weight_version"]}

    @app.post("/v1/flush_cache")
    async def flush_cache() -> dict[str, Any]:
        ready()
        await settle(submit(service.submit_op, lambda engine: engine.flush_cache()))
        return {"cached_pages": service.stats["cached_pages"]}

    @app.get("/health")
    async def health() -> Response:
        if service.ready and not updating[0]:
            return JSONResponse({"status": "ok"})
        state = "loading" if not service.ready else "updating weights"
        return JSONResponse({"status": state}, status_code=503)

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        ready()
        engine = service.engine
        mc = engine.model_config
        return {"model_path": str(model_dir), "architecture": mc.architecture,
                "vocab_size": mc.vocab_size, "dtype": str(engine.config.dtype).split(".")[-1],
                "device": str(engine.config.device), "tp_size": engine.config.tp_size,
                "weight_version": service.stats["weight_version"], "stats": service.stats}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return _Guard(app, api_key, metrics)
