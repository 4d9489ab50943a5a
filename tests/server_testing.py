"""The server's app and scoring service over a given engine, in process (no uvicorn, no
port): what the in-process server tests share."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenspeed import Engine
from tokenspeed.server.app import create_app
from tokenspeed.server.metrics import Metrics
from tokenspeed.server.scoring import ScoringService


@contextmanager
def serving(engine: Engine, model_dir: Path) -> Iterator[tuple[ScoringService, object]]:
    """(service, app) with the service's thread running and the engine ready; the service
    stops (and closes the engine) on exit."""
    service: ScoringService
    metrics = Metrics(lambda: service.stats)
    service = ScoringService(lambda: engine, metrics)
    app = create_app(service, metrics, api_key=None, max_request_bytes=1 << 20,
                     model_dir=model_dir, to_token_ids=lambda sequences: sequences)
    service.start()
    try:
        deadline = time.monotonic() + 120
        while not service.ready:
            assert service.load_error is None and time.monotonic() < deadline
            time.sleep(0.01)
        yield service, app
    finally:
        service.stop()
