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
from .models import InMemoryCheckpoint, model_config
from .padded import ids_to_host, padded_sequences, scatter_scores
from .parallel.group import check_shardable
from .parallel.launch import launched_spmd
from .parallel.workers import WorkerPool
from .session import MergedPart, MergedSession, Part, ScoringSession
from .shard import LocalShard
from .weight_sync import DEFAULT_BUCKET_BYTES


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

    def __init__(self, model_path: str | os.PathLike | InMemoryCheckpoint, *,
                 device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, page_size: int = 16,
                 max_batch_tokens: int = 8192, kv_cache_tokens: int | None = None,
                 enable_prefix_cache: bool = True, tp_size: int = 1,
                 max_batch_requests: int = 256, lean_vocab_chunk: int | None | str = "auto",
                 logprob_mode: str = "partials", deterministic: bool = False,
                 check_batches: bool = False):
        self.config = EngineConfig(model_path, device=device, dtype=dtype, page_size=page_size,
                                   max_batch_tokens=max_batch_tokens,
                                   max_batch_requests=max_batch_requests,
                                   kv_cache_tokens=kv_cache_tokens,
                                   enable_prefix_cache=enable_prefix_cache, tp_size=tp_size,
                                   lean_vocab_chunk=lean_vocab_chunk, logprob_mode=logprob_mode,
                                   deterministic=deterministic, check_batches=check_batches)
        self._lock = threading.RLock()
        self._closed = False
        cfg = self.config
        self._backend: LocalShard | WorkerPool
        if cfg.tp_size > 1 and not launched_spmd():
            self.model_config = model_config(cfg.model_path)
            check_shardable(self.model_config, cfg.tp_size)
            self._backend = WorkerPool(cfg.tp_size, LocalShard, cfg)
        else:
            if cfg.tp_size > 1:
                check_shardable(model_config(cfg.model_path), cfg.tp_size)
            self._backend = LocalShard(cfg)
            self.model_config = self._backend.model_config

    @classmethod
    def from_hf_model(cls, model: Any, **engine_kwargs: Any) -> Engine:
        """An engine over a transformers ``PreTrainedModel`` held in memory (its config and
        state dict; no checkpoint on disk), e.g. the trainer's reference policy. The
        engine copies the weights into its own layout and dtype; ``engine_kwargs`` are
        the constructor's. With tp_size > 1 from a plain process the weights reach the
        workers through shared memory."""
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "to_dict") or not hasattr(model, "state_dict"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got "
                            f"{type(model).__name__}")
        hf_config = config.to_dict()
        if not hf_config.get("architectures"):
            hf_config["architectures"] = [type(model).__name__]
        weights = {name: t.detach() for name, t in model.state_dict().items()}
        return cls(InMemoryCheckpoint(hf_config, weights), **engine_kwargs)

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
    def validate(self, sequences: Sequence[Mapping[str, Any]], temperature: float = 1.0,
                 **options: Any) -> None:
        """Raise what ``compute_log_probs(sequences, temperature, **options)`` would raise
        for this input (an ``InvalidSequenceError`` naming the sequence and field, or a
        plain ValueError/TypeError for the options), scoring and changing nothing.
        ``options``: top_k, top_p, min_p, top_logprobs, token_ids."""
        return self._call("validate", ids_to_host(sequences), temperature, **options)

    @_serialised
    def compute_log_probs(self, sequences: Sequence[Mapping[str, Any]], temperature: float = 1.0,
                          *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                          return_entropy: bool = False, top_logprobs: int = 0,
                          token_ids: Sequence[int] | None = None, return_tensors: bool = False,
                          pad_to: int | None = None, return_routed_experts: bool = False,
                          cancelled: Set[int] | None = None) -> dict[str, Any]:
        """log p(completion token | everything before it) for every completion token.

        ``sequences``: dicts with ``prompt_token_ids`` (at least one id) and
        ``completion_token_ids`` (lists, tuples or 1-D integer tensors of ids, on any
        device; ints, numpy integers or 0-d integer tensors). Returns {"log_probs",
        "tokens"} (+ "entropy"): lists of exactly len(completion) floats/ints per
        sequence, or with return_tensors [N, W] tensors on the engine's device (fp32
        scores, int64 tokens, zeros past each completion) plus a bool "mask", W the
        longest completion or ``pad_to``. Every result carries "weight_version". A bad
        sequence raises ``InvalidSequenceError`` before anything runs.

        Sampler filters (defaults: off): scores are log-probs under the distribution the
        rollout sampled from, temperature, then top_k (0..64), top_p (0, 1], min_p [0, 1),
        renormalised; a filtered-out token scores -inf, entropy is over the kept set.
        A sequence dict may override top_k, top_p and min_p for itself.
        ``top_logprobs`` k (0..64) adds "top_logprobs": per sequence {"ids", "logprobs"}
        [n, k] (descending, ties to the lower id). ``token_ids`` (one id list for every
        position, or per sequence a dict entry "token_ids": one list, or one list per
        scored position) adds "token_ids_logprobs": per sequence, per position, the
        log-probs of the ids asked. With return_tensors these are padded tensors
        (ids -1, scores nan where nothing was asked). docs/design.md has the rules.

        MoE models: ``return_routed_experts`` adds "routed_experts", per sequence the
        experts each of its len(prompt) + len(completion) - 1 first tokens used in every
        MoE layer, [positions, MoE layers, top_k] in the router's order (nested lists, or
        with return_tensors one int32 tensor padded with -1). A sequence may carry
        "routed_experts" of that shape to force those experts (routing replay); the
        prefix cache then shares K/V only with identically routed tokens.

        ``cancelled``: a set of sequence indices that another thread may add to while the
        call runs (a server whose clients went away). Between batches, their remaining
        work is dropped and their pages freed; their scores come back NaN, every other
        sequence's as without it. Needs the model in this process at tp_size 1.
        """
        kwargs: dict[str, Any] = dict(
            return_entropy=return_entropy, return_tensors=return_tensors, pad_to=pad_to,
            top_k=top_k, top_p=top_p, min_p=min_p, top_logprobs=top_logprobs,
            token_ids=token_ids, return_routed_experts=return_routed_experts)
        if cancelled is not None:
            if isinstance(self._backend, WorkerPool):
                raise ValueError("cancelled needs tp_size 1 (a live set cannot reach "
                                 "worker processes)")
            kwargs["cancelled"] = cancelled
        return self._call("compute_log_probs", ids_to_host(sequences), temperature, **kwargs)

    @_serialised
    def session(self, temperature: float = 1.0, *, top_k: int = 0, top_p: float = 1.0,
                min_p: float = 0.0, return_entropy: bool = False, top_logprobs: int = 0,
                token_ids: Sequence[int] | None = None, return_tensors: bool = False,
                return_routed_experts: bool = False) -> Session:
        """A scoring session: compute_log_probs's options fixed, its sequences given in
        parts that share the scheduler's batches and finish one by one::

            with engine.session(temperature=0.7) as session:
                a = session.add(seqs_a)        # validated as compute_log_probs would
                b = session.add(seqs_b)        # queued behind a's requests
                while not (a.done and b.done):
                    for part in session.step():    # one batch; parts that finished
                        out = part.result()        # compute_log_probs's dict for it

        ``add`` raises what compute_log_probs would for its sequences (and for bad options)
        and adds nothing; ``step`` runs one batch, or waits for the device when nothing is
        left to run; ``cancel(part)`` drops a part's remaining work. A part's results are
        those of compute_log_probs on the same sequences up to the batch company: bitwise
        in deterministic mode, else to the GEMMs' rounding. While a session is open the
        engine runs no other scoring call, and no weight update while a part is in flight.
        From a plain process with tp_size > 1 (worker processes) each step is one merged
        compute_log_probs call of the parts added since the previous step (lists only).
        """
        options: dict[str, Any] = dict(return_entropy=return_entropy,
                                       return_tensors=return_tensors,
                                       return_routed_experts=return_routed_experts)
        rich = dict(top_k=top_k, top_p=top_p, min_p=min_p, top_logprobs=top_logprobs,
                    token_ids=token_ids)
        if isinstance(self._backend, WorkerPool):
            return Session(self, MergedSession(self._backend.call, temperature,
                                               rich_options=rich, **options))
        return Session(self, self._backend.session(temperature, **options, **rich))

    @_serialised
    def score_padded(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                     temperature: float = 1.0, **options: Any) -> dict[str, Any]:
        """Score a trainer's padded batch: ``[B, L]`` ids and masks (left or right padding,
        any device). Returns every per-token output of ``compute_log_probs(**options)`` as
        ``[B, L]`` fp32 on the engine's device: ``log_probs[b, i]`` is log p(input_ids[b, i]
        | the attended tokens before it) where ``response_mask[b, i]`` is 1, and 0
        elsewhere; plus "weight_version". Each row's response must be one contiguous run
        of attended tokens that ends the row's attended tokens, after at least one prompt
        token; a malformed row raises ValueError naming it, before anything runs.
        """
        seqs, response = padded_sequences(input_ids, attention_mask, response_mask)
        result = self._call("compute_log_probs", seqs, temperature, return_tensors=True,
                            **options)
        return scatter_scores(result, response, self.config.device)

    def score_responses(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                        response_mask: Tensor, temperature: float = 1.0, **options: Any
                        ) -> dict[str, Any]:
        """``score_padded`` for the split layout: prompts ``[B, P]`` (left-padded) and
        responses ``[B, R]`` (right-padded), each with its attention mask. Returns the
        per-token outputs as ``[B, R]``, aligned with ``response_ids``."""
        for name, t in (("prompt_mask", prompt_mask), ("response_ids", response_ids),
                        ("response_mask", response_mask)):
            if not isinstance(t, Tensor) or t.dim() != 2:
                raise TypeError(f"{name} must be a 2-D tensor, got "
                                f"{getattr(t, 'shape', type(t).__name__)}")
        if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() != 2 \
                or prompt_ids.shape[0] != response_ids.shape[0]:
            raise ValueError(f"prompt_ids must be [B, P] with the B of response_ids "
                             f"{tuple(response_ids.shape)}, got "
                             f"{getattr(prompt_ids, 'shape', type(prompt_ids).__name__)}")
        width = prompt_ids.shape[1]
        device = response_ids.device
        response = response_mask.to(device)
        result = self.score_padded(
            torch.cat([prompt_ids.to(device, response_ids.dtype), response_ids], 1),
            torch.cat([prompt_mask.to(device, response.dtype), response], 1),
            torch.cat([torch.zeros_like(prompt_mask, device=device, dtype=response.dtype),
                       response], 1),
            temperature, **options)
        return {key: value[:, width:].contiguous()
                if isinstance(value, Tensor) and value.dim() >= 2 else value
                for key, value in result.items()}

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
    def init_weight_sync_group(self, master_address: str, master_port: int, rank_offset: int,
                               world_size: int, backend: str = "nccl", *,
                               timeout_s: float = 1800.0) -> None:
        """Join a trainer's weight-sync group (``tokenspeed.weight_sync``): the trainer is
        rank 0 and calls ``weight_sync.init_weight_sync_group(..., rank=0, ...)`` at the
        same time; each engine TP rank joins as rank_offset + its TP rank (engine replicas
        of data parallelism each take their own rank_offset, or their own group). Blocks
        until all ``world_size`` ranks joined. A group made earlier is replaced."""
        return self._call("init_weight_sync_group", master_address, master_port, rank_offset,
                          world_size, backend, timeout_s)

    @_serialised
    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[Any],
                                        shapes: Sequence[Sequence[int]], src: int = 0, *,
                                        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                                        check_finite: bool = True) -> None:
        """Receive an update broadcast by the trainer's ``weight_sync.send_weights`` (HF
        names, full tensors; (names, dtypes, shapes) as ``weight_sync.metadata_of`` gives
        them, in the same order) and write it as ``update_weights`` does: each rank keeps
        its shard, the version is bumped and the prefix cache flushed.

        Every tensor is received and checked before any is written: names, shapes and
        dtypes first, values (NaN/inf) as they arrive; if any rank (the trainer included)
        rejects the update, every rank raises and the old weights and cache stay. The
        whole update is staged meanwhile (on the GPU with NCCL: 15 GB for a 7B in bf16).
        """
        return self._call("update_weights_from_distributed", names, dtypes, shapes, src,
                          bucket_bytes=bucket_bytes, check_finite=check_finite)

    @_serialised
    def update_weights_from_ipc(self, handles: Mapping[str, Any], *, check_finite: bool = True
                                ) -> None:
        """``update_weights`` from a trainer on the same GPU(s): ``handles`` maps HF names
        to ``weight_sync.ipc_handles(...)`` entries, made afresh for each update (CUDA
        IPC: the engine reads the trainer's memory, no copy through the host). The
        trainer keeps the tensors alive and unchanged, and its process running, until
        this returns; by then the engine has waited for its copies out of them and holds
        no reference to them, whether the update landed or was rejected (the error's
        traceback keeps no frame locals). Same checks and atomicity as update_weights."""
        return self._call("update_weights_from_ipc", handles, check_finite=check_finite)
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
        - ``waiting``, ``running``: requests queued / admitted (both 0 when no call or
          session has work in flight);
        - ``scored_tokens``: completion tokens scored since the engine was built;
        - ``weight_version``: the number of updates (``update_weights`` and its
          ``_from_distributed`` / ``_from_ipc`` forms) that wrote weights;
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


class Session:
    """Engine.session's handle: each call holds the engine's lock, like the engine's own."""

    def __init__(self, engine: Engine, session: ScoringSession | MergedSession):
        self._engine, self._session = engine, session

    def _locked(self, method: str, *args: Any) -> Any:
        with self._engine._lock:
            if self._engine._closed:
                raise RuntimeError("engine is closed")
            return getattr(self._session, method)(*args)

    def add(self, sequences: Sequence[Mapping[str, Any]], *, pad_to: int | None = None
            ) -> Part | MergedPart:
        return self._locked("add", ids_to_host(sequences), pad_to)

    def step(self) -> list[Part | MergedPart]:
        return self._locked("step")

    def cancel(self, part: Part | MergedPart) -> None:
        self._locked("cancel", part)

    def close(self) -> None:
        """Abort what is left of its parts; a closed engine has nothing left to abort."""
        with self._engine._lock:
            if not self._engine._closed:
                self._session.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
