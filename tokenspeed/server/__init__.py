"""`tokenspeed serve`: compute_log_probs over HTTP (docs/server.md).

FastAPI on uvicorn: an ASGI stack whose event loop handles many slow clients on one
thread while the engine runs on its own (scoring.py), with graceful shutdown on SIGTERM
built in; prometheus_client renders /metrics.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from ..engine import Engine
from ..inputs import InvalidSequenceError
from ..text import encode, has_tokenizer, load_tokenizer
from .app import create_app
from .metrics import Metrics
from .scoring import ScoringService

__all__ = ["run_server", "TextEncoder"]


class TextEncoder:
    """Turns sequences given as text (prompt, completion) into token ids with the model
    folder's tokenizer, loaded on first use; sequences given as ids pass unchanged, and
    anything else is left for the engine to reject with its own message."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._lock = threading.Lock()
        self._tokenizer: Any = None

    def _get(self, index: int) -> Any:
        with self._lock:
            if self._tokenizer is None:
                if not has_tokenizer(self.model_dir):
                    raise InvalidSequenceError(
                        index, None, "prompt and completion are text, but the model folder "
                                     "has no tokenizer; give prompt_token_ids and "
                                     "completion_token_ids instead")
                self._tokenizer = load_tokenizer(self.model_dir)
            return self._tokenizer

    def __call__(self, sequences: Any) -> Any:
        if not isinstance(sequences, list):
            return sequences
        out = []
        for i, item in enumerate(sequences):
            if (isinstance(item, dict) and "prompt" in item and "completion" in item
                    and "prompt_token_ids" not in item and "completion_token_ids" not in item):
                for key in ("prompt", "completion"):
                    if not isinstance(item[key], str):
                        raise InvalidSequenceError(i, key, f"{key} must be a string, got "
                                                           f"{type(item[key]).__name__}")
                prompt, completion = encode(self._get(i), item["prompt"], item["completion"])
                item = {"prompt_token_ids": prompt, "completion_token_ids": completion}
            out.append(item)
        return out


def run_server(load_engine: Callable[[], Engine], model_dir: Path, *, host: str, port: int,
               api_key: str | None, max_request_bytes: int) -> int:
    """Serve until SIGTERM or Ctrl-C; returns 0 after a graceful stop. The engine is
    built on the scoring thread once the port is open (/health says 503 meanwhile); a
    model that fails to load stops the server and its error is raised here."""
    service: ScoringService
    metrics = Metrics(lambda: service.stats)
    server: uvicorn.Server
    service = ScoringService(load_engine, metrics, on_fatal=lambda: server.handle_exit(0, None),
                             banner=f"tokenspeed: serving {model_dir} on http://{host}:{port}")
    app = create_app(service, metrics, api_key=api_key, max_request_bytes=max_request_bytes,
                     model_dir=model_dir, to_token_ids=TextEncoder(model_dir))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           lifespan="on"))
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; a
    # handler here makes that a no-op, so a SIGTERM'd server exits 0 (Ctrl-C still
    # ends as KeyboardInterrupt)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if service.load_error is not None:
        raise service.load_error
    return 0
