"""Engine: the public facade over one backend with the same methods.

The backend is a ``LocalShard`` (this process holds the model: tp_size 1, or one rank of a
launched tensor-parallel job) or a ``WorkerPool`` (tp_size > 1 from a plain process: the
engine spawns one worker per rank, each holding a LocalShard, and forwards every call).
The facade adds what both need: the closed state and one call at a time.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence, Set
from functools import wraps
from typing import Any

import torch
from torch import Tensor

from .config import EngineConfig
from .models import ModelConfig
from .parallel.group import check_shardable
from .parallel.launch import launched_spmd
from .parallel.workers import WorkerPool
from .shard import LocalShard


def _serialised(method):
    """One call at a time per engine: its scheduler, KV pool and weights are shared
    state, so calls from several threads run one after the other."""
    @wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            if self._closed:
                raise RuntimeError("engine is closed")
            return method(self, *args, **kwargs)
    return locked


class Engine:
    """Scores completions under an HF Llama/Qwen2/Qwen3 checkpoint (docs/design.md has
    the API and its contracts).

    tp_size > 1 shards the model over a tensor-parallel group. Inside a process group
    (torchrun) this engine is one rank's shard and every rank makes the same calls; from
    a plain process it spawns tp_size workers and forwards every call to them.

    An engine may be shared by threads: its calls run one at a time.
    """

    def __init__(self, model_path: str | os.PathLike, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, page_size: int = 16,
                 max_batch_tokens: int = 8192, kv_cache_tokens: int | None = None,
                 enable_prefix_cache: bool = True, tp_size: int = 1,
                 max_batch_requests: int = 256, lean_vocab_chunk: int | None | str = "auto",
                 logprob_mode: str = "partials", check_batches: bool = False):
        self.config = EngineConfig(model_path, device=device, dtype=dtype, page_size=page_size,
                                   max_batch_tokens=max_batch_tokens,
                                   max_batch_requests=max_batch_requests,
                                   kv_cache_tokens=kv_cache_tokens,
                                   enable_prefix_cache=enable_prefix_cache, tp_size=tp_size,
                                   lean_vocab_chunk=lean_vocab_chunk, logprob_mode=logprob_mode,
                                   check_batches=check_batches)
        self._lock = threading.RLock()
        self._closed = False
        cfg = self.config
        self._backend: LocalShard | WorkerPool
        if cfg.tp_size > 1 and not launched_spmd():
            self.model_config = ModelConfig.from_dir(cfg.model_path)
            check_shardable(self.model_config, cfg.tp_size)
            self._backend = WorkerPool(cfg.tp_size, LocalShard, cfg)
        else:
            if cfg.tp_size > 1:
                check_shardable(ModelConfig.from_dir(cfg.model_path), cfg.tp_size)
            self._backend = LocalShard(cfg)
            self.model_config = self._backend.model_config

    @property
    def shard(self) -> LocalShard:
        """This process's backend (model, KV pool, scheduler, runner), for inspection and
        tests; an engine that forwards to spawned workers has none."""
        if not isinstance(self._backend, LocalShard):
            raise RuntimeError("this engine forwards to tensor-parallel worker processes; "
                               "it holds no shard in this process")
        return self._backend

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self._backend, WorkerPool):
            return self._backend.call(method, *args, **kwargs)
        return getattr(self._backend, method)(*args, **kwargs)

    @_serialised
    def validate(self, sequences: Sequence[Mapping[str, Any]], temperature: float = 1.0
                 ) -> None:
        """Raise what ``compute_log_probs(sequences, temperature)`` would raise for this
        input (an ``InvalidSequenceError`` naming the sequence and field, or a plain
        ValueError/TypeError for the options), scoring and changing nothing."""
        return self._call("validate", sequences, temperature)

    @_serialised
    def compute_log_probs(self, sequences: Sequence[Mapping[str, Any]], temperature: float = 1.0,
                          *, return_entropy: bool = False, return_tensors: bool = False,
                          cancelled: Set[int] | None = None) -> dict[str, Any]:
        """log p(completion token | everything before it) for every completion token.

        ``sequences``: dicts with ``prompt_token_ids`` (at least one id) and
        ``completion_token_ids`` (lists, tuples or 1-D integer tensors of ids; ints, numpy
        integers or 0-d integer tensors). Returns {"log_probs", "tokens"} (+ "entropy"):
        lists of exactly len(completion) floats/ints per sequence, or with return_tensors
        padded [N, max_M] tensors (fp32 scores, int64 tokens) plus a bool "mask". A bad
        sequence raises ``InvalidSequenceError`` before anything runs.

        ``cancelled``: a set of sequence indices that another thread may add to while the
        call runs (a server whose clients went away). Between batches, their remaining
        work is dropped and their pages freed; their scores come back NaN, every other
        sequence's as without it. Needs the model in this process at tp_size 1.
        """
        kwargs: dict[str, Any] = dict(return_entropy=return_entropy,
                                      return_tensors=return_tensors)
        if cancelled is not None:
            if isinstance(self._backend, WorkerPool):
                raise ValueError("cancelled needs tp_size 1 (a live set cannot reach "
                                 "worker processes)")
            kwargs["cancelled"] = cancelled
        return self._call("compute_log_probs", sequences, temperature, **kwargs)

    @_serialised
    def update_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], *,
                       check_finite: bool = True) -> None:
        """Replace weights by HF name; bumps ``weight_version`` and flushes the prefix cache
        (K/V computed under old weights never scores).

        Every name, shape and dtype is checked before anything is written, and with
        ``check_finite`` every value too (NaN/inf, the mark of a diverged trainer, would
        turn every score into NaN): a rejected update leaves the old weights. Ctrl-C during
        the writes is held until they finish. Should a write still fail (a device error),
        the prefix cache is flushed, the version bumped, and scoring refuses to run until
        an update of the parameters it was writing succeeds.
        """
        if isinstance(self._backend, WorkerPool) and not isinstance(weights, Mapping):
            weights = list(weights)  # a generator cannot travel to the workers
        return self._call("update_weights", weights, check_finite=check_finite)

    @_serialised
    def flush_cache(self) -> None:
        """Empty the prefix cache (pages held by no request return to the pool)."""
        return self._call("flush_cache")

    @_serialised
    def stats(self) -> dict[str, Any]:
        """Counters of the engine and its scheduler (under tensor parallelism, rank 0's;
        every rank's are the same):

        - ``total_pages``, ``free_pages``, ``cached_pages`` (full pages the prefix cache
          holds, free to evict), ``owned_pages`` (held by requests in flight): the KV pool,
          in pages of ``page_size`` tokens; ``kv_cache_tokens`` = total_pages * page_size;
        - ``prefix_hit_tokens``: tokens served from the prefix cache instead of recomputed,
          of which ``same_batch_hit_tokens`` were written earlier in the same batch;
        - ``inserted_pages``, ``evicted_pages``: pages that entered / left the prefix cache;
        - ``waiting``, ``running``: requests queued / admitted (both 0 between calls);
        - ``scored_tokens``: completion tokens scored since the engine was built;
        - ``weight_version``: the number of ``update_weights`` calls that wrote weights;
        - ``page_size``, ``tp_size``: the configuration.
        """
        return self._call("stats")

    def close(self) -> None:
        """Free the model, the KV pool and the scheduler (or stop the tensor-parallel
        workers). Later calls raise; closing again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if isinstance(self._backend, WorkerPool):
                self._backend.shutdown()
            else:
                self._backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
