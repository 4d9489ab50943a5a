"""The scoring loop: one thread owns the engine; HTTP handlers queue work and await it.

Each turn the thread takes the oldest queued item. A weight update or cache flush runs
alone. A scoring request is merged with every later queued request that has the same
options (temperature, return_entropy, ...) up to the next update: each is validated on
its own first (a bad one fails alone), the rest run as one ``compute_log_probs`` call,
and each request gets exactly its own slice of the results. Requests that arrive while a
call runs join the next one. Because updates are never merged past, a request admitted
before an update is scored on the old weights and one admitted after on the new ones.

A request whose client went away is dropped from the queue, or, once its call runs, its
sequences are cancelled in the engine between batches (pages freed, others unaffected).
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
    offset: int | None = None  # first index in the running call, once merged

    def __post_init__(self) -> None:
        # an option left out and the same option at its default share calls
        given = {**_DEFAULTS, **self.options}
        self.key = json.dumps(given, sort_keys=True, default=repr)


@dataclass(eq=False)
class EngineOp(_Work):
    """A state change (weight update, cache flush) that no scoring call may straddle."""
    run: Callable[[Engine], Any]


class ScoringService:
    def __init__(self, load_engine: Callable[[], Engine], metrics: Metrics,
                 on_fatal: Callable[[], None] = lambda: None, banner: str = ""):
        self._load_engine, self.metrics, self.on_fatal = load_engine, metrics, on_fatal
        self._banner = banner
        self._cond = threading.Condition()
        self._queue: deque[ScoreJob | EngineOp] = deque()
        self._cancelled: set[int] = set()  # indices of the running call's gone sequences
        self._stopping = False
        self.ready = False
        self.load_error: BaseException | None = None
        self.engine: Engine | None = None
        self.stats: dict[str, Any] = {}  # engine.stats() after the latest engine call
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
            elif job.offset is not None:
                self._cancelled.update(range(job.offset, job.offset + len(job.sequences)))

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
                    self._score(work)
        finally:
            self.engine.close()

    def _next(self) -> EngineOp | list[ScoreJob] | None:
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

    def _score(self, jobs: list[ScoreJob]) -> None:
        valid = []
        for job in jobs:
            try:
                self.engine.validate(job.sequences, job.options.get("temperature", 1.0))
                valid.append(job)
            except (ValueError, TypeError) as e:
                job.settle(error=RequestError(e))
        sequences: list[Any] = []
        with self._cond:
            self._cancelled = set()
            for job in valid:
                if not job.gone:
                    job.offset = len(sequences)
                    sequences += job.sequences
            merged = [job for job in valid if not job.gone]
            cancelled = self._cancelled
        if not merged:
            return
        spans = [(job, job.offset, len(job.sequences)) for job in merged]
        version = self.stats["weight_version"]
        self.metrics.merged_requests.observe(len(merged))
        self.metrics.merged_sequences.observe(len(sequences))
        self.metrics.running.set(len(merged))
        # across tensor-parallel workers a live set cannot travel: a gone client's
        # sequences are then scored and dropped
        extra = {"cancelled": cancelled} if self.engine.config.tp_size == 1 else {}
        try:
            result = self.engine.compute_log_probs(sequences, **merged[0].options, **extra)
            error = None
        except (ValueError, TypeError) as e:  # options, shared by every merged job
            result, error = None, RequestError(e)
        except Exception as e:  # noqa: BLE001 - the clients get a 500, the engine is intact
            result, error = None, e
        finally:
            with self._cond:
                for job in merged:
                    job.offset = None
            self._refresh_stats()
            self.metrics.running.set(0)
        for job, start, n in spans:
            if job.gone:
                continue
            if error is not None:
                job.settle(error=error)
                continue
            # per-sequence outputs are lists with one entry per sequence; the rest
            # (a weight_version the engine may report) apply to every job as they are
            part = {k: v[start:start + n] if isinstance(v, list) and len(v) == len(sequences)
                    else v for k, v in result.items()}
            part.setdefault("weight_version", version)
            self.metrics.scored(job, part)
            job.settle(part)

    def _refresh_stats(self) -> None:
        self.stats = self.engine.stats()
