"""The scoring loop: one thread owns the engine; HTTP handlers queue work and await it.

Scoring requests with the same options (temperature, return_entropy, ...) share an engine
session (Engine.session): the thread opens one for the oldest queued request's options,
adds every queued request with those options up to the next weight update or cache flush,
then steps it one batch at a time. Between batches it admits requests that arrived with
the same options, as long as no request with other options and no update or flush is
queued ahead of them; each request is validated as its part is added (a bad one fails
alone) and is answered once its own sequences are scored, its part handed to the HTTP
side, which packages and encodes it. A session that runs out of parts is closed; then
the next queued item runs: an update or flush alone, or another session. Because
admission stops at an update, a request admitted before it is scored on the old weights
and one admitted after on the new ones, and no session straddles it.

A request whose client went away is dropped from the queue, or, once admitted, its part
is cancelled between batches (its requests aborted, pages freed, others unaffected).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from .metrics import Metrics


class RequestError(Exception):
    """A request the engine rejected with a ValueError or TypeError (``cause``): the
    client's fault."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


class ShuttingDown(RuntimeError):
    pass


@dataclass(eq=False)
class _Work:
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def done() -> None:
            if not self.future.done():
                if error is None:
                    self.future.set_result(result)
                else:
                    self.future.set_exception(error)
        self.loop.call_soon_threadsafe(done)


_DEFAULTS = {name: p.default for name, p in
             inspect.signature(Engine.compute_log_probs).parameters.items()
             if p.default is not inspect.Parameter.empty}


@dataclass(eq=False)
class ScoreJob(_Work):
    sequences: list[Any]
    options: dict[str, Any]
    key: str = ""
    admitted: float = field(default_factory=time.perf_counter)
    gone: bool = False
    part: Any = None  # its part of the running session, once added

    def __post_init__(self) -> None:
        # an option left out and the same option at its default share sessions
        given = {**_DEFAULTS, **self.options}
        self.key = json.dumps(given, sort_keys=True, default=repr)


@dataclass(eq=False)
class EngineOp(_Work):
    """A state change (weight update, cache flush) that no scoring session may straddle."""
    run: Callable[[Engine], Any]


class ScoringService:
    def __init__(self, load_engine: Callable[[], Engine], metrics: Metrics,
                 on_fatal: Callable[[], None] = lambda: None, banner: str = ""):
        self._load_engine, self.metrics, self.on_fatal = load_engine, metrics, on_fatal
        self._banner = banner
        self._cond = threading.Condition()
        self._queue: deque[ScoreJob | EngineOp] = deque()
        self._gone: list[ScoreJob] = []  # admitted jobs whose clients went away
        self._stopping = False
        self.ready = False
        self.load_error: BaseException | None = None
        self.engine: Engine | None = None
        self.stats: dict[str, Any] = {}  # engine.stats() after the latest engine step
        self._thread = threading.Thread(target=self._main, name="tokenspeed-engine",
                                        daemon=True)
        metrics.queue_depth.set_function(lambda: len(self._queue))

    # --- HTTP side (event loop thread): never waits for the engine -------------------
    def start(self) -> None:
        self._thread.start()

    def submit_score(self, sequences: list[Any], options: dict[str, Any]) -> ScoreJob:
        job = ScoreJob(asyncio.get_running_loop().create_future(), asyncio.get_running_loop(),
                       sequences, options)
        self._put(job)
        return job

    def submit_op(self, run: Callable[[Engine], Any]) -> EngineOp:
        op = EngineOp(asyncio.get_running_loop().create_future(), asyncio.get_running_loop(),
                      run)
        self._put(op)
        return op

    def _put(self, work: ScoreJob | EngineOp) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            self._queue.append(work)
            self._cond.notify()

    def cancel(self, job: ScoreJob) -> None:
        """The client went away: drop the job's remaining work."""
        with self._cond:
            job.gone = True
            if job in self._queue:
                self._queue.remove(job)
            elif job.part is not None:
                self._gone.append(job)

    def stop(self) -> None:
        """Finish queued work, then close the engine (the thread's last act)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    # --- engine thread ---------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.engine = self._load_engine()
            self._refresh_stats()
        except BaseException as e:  # noqa: BLE001 - reported by the server's caller
            self.load_error = e
            self.on_fatal()
            return
        self.ready = True
        print(self._banner, file=sys.stderr, flush=True)
        try:
            while (work := self._next()) is not None:
                if isinstance(work, EngineOp):
                    self._run_op(work)
                else:
                    self._run_session(work)
        finally:
            self.engine.close()

    def _next(self) -> EngineOp | list[ScoreJob] | None:
        """The oldest queued op, or the oldest job with every later queued job of its
        options up to the next op."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            head = self._queue[0]
            if isinstance(head, EngineOp):
                return self._queue.popleft()
            jobs = []
            for work in self._queue:
                if isinstance(work, EngineOp):
                    break
                if work.key == head.key:
                    jobs.append(work)
            for job in jobs:
                self._queue.remove(job)
            return jobs

    def _arrived(self, key: str) -> list[ScoreJob]:
        """Jobs of the running session's options at the head of the queue: none once an
        op or a job with other options waits ahead, so those never starve."""
        with self._cond:
            jobs = []
            while self._queue and isinstance(self._queue[0], ScoreJob) \
                    and self._queue[0].key == key:
                jobs.append(self._queue.popleft())
            return jobs

    def _run_op(self, op: EngineOp) -> None:
        try:
            result = op.run(self.engine)
            error = None
        except (ValueError, TypeError) as e:
            result, error = None, RequestError(e)
        except Exception as e:  # noqa: BLE001 - the client gets a 500, the engine is intact
            result, error = None, e
        self._refresh_stats()
        op.settle(result, error)

    def _run_session(self, jobs: list[ScoreJob]) -> None:
        options = jobs[0].options
        try:
            session = self.engine.session(**options)
        except (ValueError, TypeError) as e:  # an unknown option: the same for every job
            for job in jobs:
                job.settle(error=RequestError(e))
            return
        active: dict[Any, ScoreJob] = {}
        counts = [0, 0]  # requests, sequences admitted
        try:
            self._admit(session, jobs, active, counts, "new")
            while active:
                for part in session.step():
                    job = active.pop(part, None)
                    if job is not None:
                        job.settle(part)
                self._refresh_stats()
                self._drop_gone(session, active)
                self._admit(session, self._arrived(jobs[0].key), active, counts, "running")
                self.metrics.running.set(len(active))
        except Exception as e:  # noqa: BLE001 - the clients get a 500, the engine is intact
            error = RequestError(e) if isinstance(e, (ValueError, TypeError)) else e
            for job in active.values():
                job.settle(error=error)
        finally:
            session.close()
            self._refresh_stats()
            self.metrics.running.set(0)
            if counts[0]:
                self.metrics.session_requests.observe(counts[0])
                self.metrics.session_sequences.observe(counts[1])

    def _admit(self, session: Any, jobs: list[ScoreJob], active: dict[Any, ScoreJob],
               counts: list[int], into: str) -> None:
        for job in jobs:
            if job.gone:
                continue
            try:
                part = session.add(job.sequences)
            except (ValueError, TypeError) as e:
                job.settle(error=RequestError(e))
                continue
            except Exception as e:  # noqa: BLE001 - e.g. torn weights: this job's 500
                job.settle(error=e)
                continue
            with self._cond:
                gone = job.gone
                job.part = part
            if gone:  # went away while it was being added
                session.cancel(part)
                continue
            active[part] = job
            counts[0] += 1
            counts[1] += len(job.sequences)
            self.metrics.admitted.labels(into).inc()
        self.metrics.running.set(len(active))

    def _drop_gone(self, session: Any, active: dict[Any, ScoreJob]) -> None:
        with self._cond:
            gone, self._gone = self._gone, []
        for job in gone:
            if active.pop(job.part, None) is not None:
                session.cancel(job.part)

    def _refresh_stats(self) -> None:
        self.stats = self.engine.stats()
