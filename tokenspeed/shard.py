"""LocalShard: one process's part of an engine (the whole model at tp_size 1, one rank's
shard under tensor parallelism): its model, KV pool, scheduler and runner.

Data flows one way: a call is validated first (so a bad call changes nothing), every
sequence with a completion becomes one scheduler request, each scheduler batch runs as
one packed forward, and each batch entry's scores land in its request's slice of a flat
result buffer. Scoring runs in sessions (session.py): compute_log_probs is a session with
one part; a server keeps one open across its requests. The batch loop never waits for the
device: scores stay there until a copy-out, which brings them to the host.
"""
from __future__ import annotations

import os
import traceback
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any

import tokenspeed_ext as tse
import torch
from torch import Tensor

from .config import EngineConfig
from .inputs import Limits, check_temperature, validate_sequences
from .interrupts import deferred_interrupts
from .kv_cache import KVCache, kv_bytes_per_token
from .layers.gemm import building_batch_invariant
from .layers.logprob_head import HeadOptions
from .models import load_model
from .models.loader import WeightMap
from .parallel.group import TPGroup, building_with, kv_head_range
from .parallel.launch import init_tp_group
from .rich import RichCall, plan
from .routing import RoutingTable, check_routed_experts
from .runner import ModelRunner
from .session import ScoreCopy, ScoringSession
from .weight_sync import (DEFAULT_BUCKET_BYTES, init_weight_sync_group, open_ipc_handles,
                          receive_weights)

MAX_CPU_KV_TOKENS = 1 << 18
# scored rows held on the device before they are copied out mid-call (32 MiB with entropy)
MAX_PENDING_ROWS = 1 << 22


class LocalShard:
    """The engine's backend in this process. Under tensor parallelism (a process group is
    up) it is this rank's shard, and every rank's shard makes the same calls; each call
    first agrees across the ranks (``TPGroup.validated``), so a call rejected on one rank
    raises on every rank before any collective runs."""

    def __init__(self, config: EngineConfig):
        self.config = cfg = config
        # (parameter, shard) pairs a failed update may have left half-written
        self._torn_weights: set[tuple[str, str | int | None]] = set()
        self.tp = init_tp_group(cfg.tp_size, cfg.device) if cfg.tp_size > 1 else TPGroup()
        # Loading and allocating run inside agreements: a rank that fails there (a bad
        # shard file, out of memory) makes every rank raise instead of leaving the others
        # waiting in the next collective. Sizing the pool runs a forward, whose
        # collectives every rank reaches in lockstep, so it runs between the two.
        self.tp.validated(self._load)
        num_pages = self._num_pages()
        if self.tp.size > 1:
            # ranks schedule in lockstep only if their pools are the same size
            num_pages = self.tp.min_int(num_pages)
        self.tp.validated(lambda: self._allocate(num_pages))
        self.weight_version = 0
        self.weight_sync = None  # the trainer's weight-sync group, once joined
        self.scored_tokens = 0
        self._next_request_id = 0
        self._session: ScoringSession | None = None  # the open one, if any

    def _load(self) -> None:
        """Load this rank's shard of the model."""
        cfg = self.config
        with building_with(self.tp), building_batch_invariant(cfg.deterministic):
            head = HeadOptions(vocab_chunk=cfg.lean_vocab_chunk,
                               gather_logits=cfg.logprob_mode == "gather")
            self.model, self.model_config = load_model(cfg.model_path, cfg.device, cfg.dtype,
                                                       head)
        mc = self.model_config
        first, end = kv_head_range(mc.num_kv_heads, self.tp.rank, self.tp.size)
        self.local_kv_heads = end - first

    def _allocate(self, num_pages: int) -> None:
        cfg, mc = self.config, self.model_config
        self.kv_cache = KVCache(mc.num_layers, num_pages, cfg.page_size, self.local_kv_heads,
                                mc.head_dim, cfg.dtype, cfg.device)
        self.scheduler = tse.Scheduler(num_pages, cfg.page_size, cfg.max_batch_tokens,
                                       cfg.max_batch_requests, cfg.enable_prefix_cache,
                                       route_keys=mc.moe is not None)
        self.routing = None if mc.moe is None else RoutingTable(
            mc.moe, num_pages * cfg.page_size, cfg.page_size, cfg.device)
        self.runner = ModelRunner(self.model, self.kv_cache, cfg.device,
                                  check_batches=cfg.check_batches)

    def _num_pages(self) -> int:
        """Pages of the KV pool: kv_cache_tokens when given; on CUDA what is left of 85% of
        the free memory after one measured batch; on the CPU a fixed budget."""
        cfg, mc = self.config, self.model_config
        per_token = kv_bytes_per_token(mc.num_layers, self.local_kv_heads, mc.head_dim,
                                       cfg.dtype)
        tokens = cfg.kv_cache_tokens
        if tokens is None:
            if cfg.device.type == "cuda":
                peak = self._batch_peak_bytes()
                free, _ = torch.cuda.mem_get_info(cfg.device)
                tokens = int((0.85 * free - peak) // per_token)
            else:
                ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                tokens = min(int(min(4 << 30, ram // 8) // per_token), MAX_CPU_KV_TOKENS)
        pages = tokens // cfg.page_size
        if pages < 1:
            raise ValueError(f"KV pool of {tokens} tokens holds no page of {cfg.page_size}")
        return min(pages, 2**31 - 1)

    def _batch_peak_bytes(self) -> int:
        """Device memory the largest batch needs beyond the weights and the pool, measured:
        one forward of max_batch_tokens tokens, every one of them scored (the head's worst
        case), over a temporary pool just large enough for it. Measuring instead of
        estimating keeps the sizing right for any model family."""
        cfg, mc = self.config, self.model_config
        lengths, left = [], cfg.max_batch_tokens
        while left > 1 and len(lengths) < cfg.max_batch_requests:
            lengths.append(min(left, mc.max_position_embeddings))
            left -= lengths[-1]
        pages = sum(-(-n // cfg.page_size) for n in lengths)
        pool = KVCache(mc.num_layers, pages, cfg.page_size, self.local_kv_heads, mc.head_dim,
                       cfg.dtype, cfg.device)
        scheduler = tse.Scheduler(pages, cfg.page_size, cfg.max_batch_tokens,
                                  cfg.max_batch_requests, False)
        for rid, n in enumerate(lengths):
            scheduler.add(rid, [0] * n, 0)
        batch = scheduler.schedule()
        torch.cuda.synchronize(cfg.device)
        torch.cuda.reset_peak_memory_stats(cfg.device)
        base = torch.cuda.memory_allocated(cfg.device)
        ModelRunner(self.model, pool, cfg.device).run(batch, 1.0, True)
        torch.cuda.synchronize(cfg.device)
        peak = torch.cuda.max_memory_allocated(cfg.device) - base
        scheduler.complete(batch)
        del pool, scheduler, batch
        torch.cuda.empty_cache()
        return peak

    def _validate(self, sequences: Any, temperature: Any, return_routed_experts: bool = False
                  ) -> tuple[list[tuple[list[int], list[int]]], float, list[Tensor | None]]:
        if self._torn_weights:
            raise RuntimeError(
                f"an earlier update_weights failed part-way, so {len(self._torn_weights)} "
                f"parameter(s) may hold a mix of old and new values; nothing is scored "
                f"until update_weights succeeds for them (e.g. "
                f"{sorted(self._torn_weights)[0]!r}) or the engine is rebuilt")
        temperature = check_temperature(temperature)
        mc = self.model_config
        limits = Limits(mc.vocab_size, mc.max_position_embeddings, self.kv_cache.num_tokens,
                        self.config.page_size)
        seqs = validate_sequences(sequences, limits)
        if return_routed_experts and mc.moe is None:
            raise ValueError("return_routed_experts: the model has no mixture-of-experts layers")
        routes = [check_routed_experts(i, item, len(p) + len(c), mc.moe)
                  for i, (item, (p, c)) in enumerate(zip(sequences, seqs))]
        return seqs, temperature, routes

    def validate(self, sequences: Sequence[Mapping[str, Any]], temperature: float = 1.0,
                 **rich_options: Any) -> None:
        self.tp.validated(lambda: self._validate_rich(sequences, temperature, rich_options))

    def session(self, temperature: float = 1.0, *, return_entropy: bool = False,
                return_tensors: bool = False, return_routed_experts: bool = False,
                **rich_options: Any) -> ScoringSession:
        """A scoring session with these call options (session.py); one is open at a time,
        and compute_log_probs opens one too. Options are checked by its ``add``."""
        if self._session is not None and not self._session.closed:
            raise RuntimeError("a scoring session is open on this engine (compute_log_probs "
                               "runs in one too); close it first")
        self._session = ScoringSession(
            self, temperature, return_entropy=return_entropy, return_tensors=return_tensors,
            return_routed_experts=return_routed_experts, rich_options=rich_options,
            max_rows=MAX_PENDING_ROWS)
        return self._session

    def compute_log_probs(self, sequences: Sequence[Mapping[str, Any]], temperature: float = 1.0,
                          *, return_entropy: bool = False, return_tensors: bool = False,
                          pad_to: int | None = None, return_routed_experts: bool = False,
                          cancelled: Set[int] | None = None, **rich_options: Any
                          ) -> dict[str, Any]:
        """``rich_options``: top_k, top_p, min_p, top_logprobs, token_ids (rich.py).
        ``cancelled``: sequence indices whose remaining work is dropped between batches."""
        if cancelled is not None and self.tp.size > 1:
            # ranks would see the set change at different batches and leave lockstep
            raise ValueError("cancelled needs tp_size 1")
        with self.session(temperature, return_entropy=return_entropy,
                          return_tensors=return_tensors,
                          return_routed_experts=return_routed_experts,
                          **rich_options) as session:
            part = session.add(sequences, pad_to)
            while not part.done:
                session.step()
                if cancelled:
                    session.drop(part, cancelled.copy())  # another thread may add to it
        return part.result()

    def _validate_rich(self, sequences: Any, temperature: Any, options: dict[str, Any],
                       return_routed_experts: bool = False
                       ) -> tuple[list[tuple[list[int], list[int]]], float, RichCall | None,
                                  list[Tensor | None]]:
        unknown = set(options) - {"top_k", "top_p", "min_p", "top_logprobs", "token_ids"}
        if unknown:
            raise TypeError(f"compute_log_probs got unexpected options {sorted(unknown)}")
        seqs, temperature, routes = self._validate(sequences, temperature, return_routed_experts)
        rich = plan(sequences, seqs, self.model_config.vocab_size, options)
        return seqs, temperature, rich, routes

    @staticmethod
    def _copy_scores(copy: ScoreCopy) -> None:
        """Store a copy-out of scores into its parts' buffers: a session's one wait for the
        device (none for device outputs)."""
        copy.store()

    def update_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], *,
                       check_finite: bool = True) -> None:
        """Every tensor is checked (on every rank) before any is written; the writes hold
        Ctrl-C until done. A write that still fails marks its parameters torn: scoring
        refuses to run until an update of them succeeds."""
        self._write_weights(self.tp.validated(lambda: self._check_weights(weights,
                                                                          check_finite)))

    def _write_weights(self, items: list[tuple[str, Tensor]]) -> None:
        """Write checked weights, flush the prefix cache and bump the version: all of it
        or, should a write fail, the parameters it was writing marked torn."""
        if self._session is not None and self._session.has_requests:
            raise RuntimeError("a scoring session has requests in flight, which would be "
                               "scored on two sets of weights; finish or close it first")
        weight_map = WeightMap(self.model, write_tied_head=True)
        targets = {(r[0], r[2]) for r in (weight_map.resolve(name) for name, _ in items)
                   if r is not None}
        with deferred_interrupts():
            try:
                with torch.no_grad():
                    for name, tensor in items:
                        weight_map.load(name, tensor)
            except BaseException:
                self._torn_weights |= targets
                raise
            finally:
                self.scheduler.flush()
                self.weight_version += 1
            self._torn_weights -= targets

    def init_weight_sync_group(self, master_address: str, master_port: int, rank_offset: int,
                               world_size: int, backend: str = "nccl",
                               timeout_s: float = 1800.0) -> None:
        """Join the trainer's weight-sync group as rank rank_offset + this TP rank."""
        if isinstance(rank_offset, bool) or not isinstance(rank_offset, int) \
                or rank_offset < 1:
            raise ValueError(f"rank_offset must be an int >= 1 (the trainer is rank 0), "
                             f"got {rank_offset!r}")
        if isinstance(world_size, int) and world_size < rank_offset + self.tp.size:
            raise ValueError(f"world_size {world_size} cannot hold the engine's "
                             f"{self.tp.size} rank(s) from rank_offset {rank_offset}")
        self.weight_sync = init_weight_sync_group(
            master_address, master_port, rank_offset + self.tp.rank, world_size, backend,
            self.config.device if backend == "nccl" else torch.device("cpu"), timeout_s)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[Any],
                                        shapes: Sequence[Sequence[int]], src: int = 0, *,
                                        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                                        check_finite: bool = True) -> None:
        if self.weight_sync is None:
            raise RuntimeError("no weight-sync group: call init_weight_sync_group first")
        weight_map = WeightMap(self.model, write_tied_head=True)
        items = receive_weights(
            self.weight_sync, names, dtypes, shapes, src,
            lambda items, finite: weight_map.check_all(items, check_finite=finite),
            bucket_bytes=bucket_bytes, check_finite=check_finite)
        self._write_weights(items)

    def update_weights_from_ipc(self, handles: Mapping[str, Any], *,
                                check_finite: bool = True) -> None:
        """The opened tensors map the trainer's memory, which it may free (or exit) once
        this returns: the copies out of it are waited for, and no reference to it
        outlives the call, whether the update lands or is rejected."""
        opened: dict[str, Tensor] = {}

        def check() -> list[tuple[str, Tensor]]:
            opened.update(open_ipc_handles(handles))
            return self._check_weights(opened, check_finite)
        try:
            # opened inside the agreement: a rank that cannot open them fails every rank
            self._write_weights(self.tp.validated(check))
            if self.config.device.type == "cuda":
                torch.cuda.synchronize(self.config.device)
        except BaseException as e:
            # the frames of the error's traceback hold the tensors, and a caller may keep
            # the error: their locals go, the message stays
            traceback.clear_frames(e.__traceback__)
            raise
        finally:
            opened.clear()

    def _check_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
                       check_finite: bool) -> list[tuple[str, Tensor]]:
        items = list(weights.items() if isinstance(weights, Mapping) else weights)
        for entry in items:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
                raise TypeError(f"weights must map HF names to tensors, got entry {entry!r:.80}")
        WeightMap(self.model, write_tied_head=True).check_all(items, check_finite=check_finite)
        return items

    def flush_cache(self) -> None:
        self.scheduler.flush()

    def stats(self) -> dict[str, Any]:
        out = dict(self.scheduler.stats())
        out.update(scored_tokens=self.scored_tokens, weight_version=self.weight_version,
                   page_size=self.config.page_size, kv_cache_tokens=self.kv_cache.num_tokens,
                   tp_size=self.tp.size)
        return out

    def close(self) -> None:
        self.weight_sync = None
        del self.runner, self.kv_cache, self.model, self.scheduler
        if self.config.device.type == "cuda":
            torch.cuda.empty_cache()
