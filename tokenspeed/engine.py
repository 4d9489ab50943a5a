"""Engine: validate a batch of (prompt, completion) sequences, schedule, run, gather.

Data flows one way: the whole call is validated first (so a bad call changes nothing),
every sequence with a completion becomes one scheduler request, each scheduler batch
runs as one packed forward, and each batch entry's scores land in its request's slice of
one flat result buffer. The batch loop never waits for the device: scores stay there
until the end of the call, which brings them to the host in one copy.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import dataclasses

import tokenspeed_ext as tse
import torch
from torch import Tensor

from . import distributed
from .config import EngineConfig
from .kv_cache import KVCache, kv_bytes_per_token
from .layers.embedding import MAX_LOGITS_ELEMENTS
from .models import ModelConfig, load_model
from .models.loader import WeightMap
from .runner import BatchScores, ModelRunner

KEYS = ("prompt_token_ids", "completion_token_ids")
MAX_CPU_KV_TOKENS = 1 << 18
# scored rows held on the device before they are copied out mid-call (32 MiB with entropy)
MAX_PENDING_ROWS = 1 << 22


def _token_list(seq: int, key: str, value: Any, vocab: int) -> list[int]:
    """The ids of one field as a list of int, or a ValueError/TypeError naming them."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"sequence {seq}: {key} must be a 1-D integer tensor, "
                            f"got {value.dtype} of shape {tuple(value.shape)}")
        value = value.tolist()
    elif isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"sequence {seq}: {key} must be a list of ints, "
                        f"got {type(value).__name__}")
    tokens = value if isinstance(value, list) else list(value)
    if not all(type(t) is int for t in tokens):
        for j, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(f"sequence {seq}: {key}[{j}] is {t!r} "
                                f"({type(t).__name__}), not an int")
        tokens = [int(t) for t in tokens]
    if tokens and (min(tokens) < 0 or max(tokens) >= vocab):
        j = next(j for j, t in enumerate(tokens) if not 0 <= t < vocab)
        raise ValueError(f"sequence {seq}: {key}[{j}] is {tokens[j]}, "
                         f"vocabulary is [0, {vocab})")
    return tokens


def _pad(rows: list[Tensor], dtype: torch.dtype) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


class Engine:
    """Scores completions under an HF Llama/Qwen2/Qwen3 checkpoint; see DESIGN.md's API.

    tp_size > 1 shards the model over a tensor-parallel group. Inside a process group
    (torchrun) this engine is one rank's shard and every rank makes the same calls; from
    a plain process it spawns tp_size workers and forwards every call to them.
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
        cfg = self.config
        self._closed = False
        self._workers: distributed.WorkerPool | None = None
        if cfg.tp_size > 1:
            model_config = ModelConfig.from_dir(cfg.model_path)
            distributed.check_shardable(model_config, cfg.tp_size)
            if not distributed.launched_spmd():
                self.model_config = model_config
                self._workers = distributed.WorkerPool(cfg.tp_size, dataclasses.asdict(cfg))
                return
            self.tp = distributed.init_tp_group(cfg.tp_size, cfg.device)
        else:
            self.tp = distributed.TPGroup()
        # Loading and allocating run inside agreements: a rank that fails there (a bad
        # shard file, out of memory) makes every rank raise instead of leaving the others
        # waiting in the next collective.
        num_pages = self.tp.validated(self._load)
        if self.tp.size > 1:
            # ranks schedule in lockstep only if their pools are the same size
            num_pages = self.tp.min_int(num_pages)
        self.tp.validated(lambda: self._allocate(num_pages))
        self.weight_version = 0
        self.scored_tokens = 0
        self._next_request_id = 0

    def _load(self) -> int:
        """Load this rank's shard of the model; returns the KV pages it has room for."""
        cfg = self.config
        with distributed.building_with(self.tp):
            self.model, self.model_config = load_model(cfg.model_path, cfg.device, cfg.dtype)
        mc = self.model_config
        first, end = distributed.kv_head_range(mc.num_kv_heads, self.tp.rank, self.tp.size)
        self.local_kv_heads = end - first
        return self._num_pages()

    def _allocate(self, num_pages: int) -> None:
        cfg, mc = self.config, self.model_config
        self.kv_cache = KVCache(mc.num_layers, num_pages, cfg.page_size, self.local_kv_heads,
                                mc.head_dim, cfg.dtype, cfg.device)
        self.scheduler = tse.Scheduler(num_pages, cfg.page_size, cfg.max_batch_tokens,
                                       cfg.max_batch_requests, cfg.enable_prefix_cache)
        self.runner = ModelRunner(self.model, self.kv_cache, cfg.device, cfg.lean_vocab_chunk,
                                  gather_logits=cfg.logprob_mode == "gather",
                                  check_batches=cfg.check_batches)

    def _num_pages(self) -> int:
        cfg, mc = self.config, self.model_config
        per_token = kv_bytes_per_token(mc.num_layers, self.local_kv_heads, mc.head_dim,
                                       cfg.dtype)
        tokens = cfg.kv_cache_tokens
        if tokens is None:
            if cfg.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(cfg.device)
                elem = torch.empty((), dtype=cfg.dtype).element_size()
                # room for one batch's activations and the head's bounded logits
                activations = (cfg.max_batch_tokens * (8 * mc.hidden_size
                                                       + 3 * mc.intermediate_size) * elem
                               + 2 * 4 * MAX_LOGITS_ELEMENTS)
                tokens = int((0.85 * free - activations) // per_token)
            else:
                ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                tokens = min(int(min(4 << 30, ram // 8) // per_token), MAX_CPU_KV_TOKENS)
        pages = tokens // cfg.page_size
        if pages < 1:
            raise ValueError(f"KV pool of {tokens} tokens holds no page of {cfg.page_size}")
        return min(pages, 2**31 - 1)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("engine is closed")

    def _validate(self, sequences: Any, temperature: Any) -> list[tuple[list[int], list[int]]]:
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
        if isinstance(sequences, (str, bytes, Mapping)) or not isinstance(sequences, Sequence):
            raise TypeError(f"sequences must be a list of dicts, got {type(sequences).__name__}")
        vocab, max_len = self.model_config.vocab_size, self.model_config.max_position_embeddings
        pool = self.kv_cache.num_tokens
        out = []
        for i, item in enumerate(sequences):
            if not isinstance(item, Mapping):
                raise TypeError(f"sequence {i}: expected a dict with {KEYS}, "
                                f"got {type(item).__name__}")
            for key in KEYS:
                if key not in item:
                    raise ValueError(f"sequence {i}: missing key {key!r}")
            prompt = _token_list(i, KEYS[0], item[KEYS[0]], vocab)
            completion = _token_list(i, KEYS[1], item[KEYS[1]], vocab)
            if not prompt:
                raise ValueError(f"sequence {i}: empty prompt (the first completion token "
                                 f"needs at least one token before it)")
            length = len(prompt) + len(completion)
            if length > max_len:
                raise ValueError(f"sequence {i}: length {length} exceeds the model's "
                                 f"max_position_embeddings {max_len}")
            page = self.config.page_size
            if completion and -(-length // page) * page > pool:
                raise ValueError(f"sequence {i}: length {length} does not fit the KV pool of "
                                 f"{pool} tokens (raise kv_cache_tokens)")
            out.append((prompt, completion))
        return out

    def compute_log_probs(self, sequences: Sequence[Mapping[str, Any]], temperature: float = 1.0,
                          *, return_entropy: bool = False, return_tensors: bool = False
                          ) -> dict[str, Any]:
        """log p(completion token | everything before it) for every completion token.

        Returns {"log_probs", "tokens"} (+ "entropy"): lists of exactly len(completion)
        floats/ints per sequence, or with return_tensors padded [N, max_M] tensors (fp32
        scores, int64 tokens) plus a bool "mask".
        """
        self._check_open()
        if self._workers is not None:
            return self._workers.call("compute_log_probs", sequences, temperature,
                                      return_entropy=return_entropy,
                                      return_tensors=return_tensors)
        seqs = self.tp.validated(
            lambda: self._validate(sequences, temperature),
            lambda v: distributed.sequences_fingerprint(v, float(temperature), return_entropy))
        lengths = [len(c) for _, c in seqs]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        flat_lp = torch.empty(offsets[-1], dtype=torch.float32)
        flat_ent = torch.empty(offsets[-1], dtype=torch.float32) if return_entropy else None
        # request id -> (first output slot, logprob_start)
        requests: dict[int, tuple[int, int]] = {}
        try:
            for i, (prompt, completion) in enumerate(seqs):
                if completion:
                    rid = self._next_request_id
                    self._next_request_id += 1
                    start = len(prompt) - 1
                    requests[rid] = (offsets[i], start)
                    self.scheduler.add(rid, prompt + completion, start)
            self._run(requests, float(temperature), flat_lp, flat_ent)
        finally:
            for rid in requests:
                self.scheduler.abort(rid)
        self.scored_tokens += offsets[-1]
        return self._package(seqs, lengths, flat_lp, flat_ent, return_tensors)

    def _run(self, requests: dict[int, tuple[int, int]], temperature: float,
             flat_lp: Tensor, flat_ent: Tensor | None) -> None:
        """Drive the scheduler until every request finished; pops finished ids.

        A batch is completed as soon as its forward is enqueued: the device runs batches
        in stream order, so its K/V is written before any later batch reads it, which is
        all the scheduler's page reuse and in-flight prefix sharing need. Its scores stay
        on the device until ``_copy_scores``, the loop's only wait for the device.
        """
        pending: list[tuple[BatchScores, Tensor]] = []
        rows = 0
        while requests:
            batch = self.scheduler.schedule()
            assert batch is not None, "scheduler has unfinished requests but made no batch"
            try:
                scores = self.runner.run(batch, temperature, flat_ent is not None)
                dst = self._destinations(batch, requests)
                assert dst.shape == scores.log_probs.shape, (dst.shape, scores.log_probs.shape)
            except BaseException:
                self._discard(batch, requests)
                raise
            if len(dst):
                pending.append((scores, dst))
                rows += len(dst)
            for rid in self.scheduler.complete(batch):
                requests.pop(rid)
            if pending and (rows >= MAX_PENDING_ROWS or not requests):
                try:
                    self._copy_scores(pending, flat_lp, flat_ent)
                except BaseException:
                    self._discard(None, requests)
                    raise
                pending, rows = [], 0

    @staticmethod
    def _destinations(batch, requests: dict[int, tuple[int, int]]) -> Tensor:
        """Flat output index (int64, host) of each scored row of the batch, in the order
        the runner returns them."""
        firsts, counts = [], []
        for e in batch.entries:
            n = e.score_end - e.score_begin
            if n > 0:
                first, start = requests[e.request_id]
                firsts.append(first + e.begin + e.score_begin - start)
                counts.append(n)
        count = torch.tensor(counts, dtype=torch.int64)
        # row i of entry j goes to firsts[j] + (i - rows before entry j)
        shift = torch.tensor(firsts, dtype=torch.int64) - (count.cumsum(0) - count)
        return torch.arange(int(count.sum())) + shift.repeat_interleave(count)

    @staticmethod
    def _copy_scores(pending: list[tuple[BatchScores, Tensor]], flat_lp: Tensor,
                     flat_ent: Tensor | None) -> None:
        """Bring the pending batches' scores to the host in one copy (which waits for the
        device) and write them to their flat output rows."""
        dst = torch.cat([d for _, d in pending])
        parts = [s.log_probs for s, _ in pending]
        if flat_ent is not None:
            parts += [s.entropy for s, _ in pending]
        values = torch.cat(parts).cpu()
        flat_lp[dst] = values[:len(dst)]
        if flat_ent is not None:
            flat_ent[dst] = values[len(dst):]

    def _discard(self, batch, requests: dict[int, tuple[int, int]]) -> None:
        """The call failed with batches in flight: ``batch`` (None when the failure came
        later, waiting for the device) may have written only some of its K/V, and so may
        an earlier batch whose error the device reports late. Abort the call's requests,
        retire the batch (else later requests wait on its pages forever) and flush the
        prefix cache, which may hold pages those batches left unwritten."""
        for rid in requests:
            self.scheduler.abort(rid)
        requests.clear()
        if batch is not None:
            self.scheduler.complete(batch)
        self.scheduler.flush()

    @staticmethod
    def _package(seqs: list[tuple[list[int], list[int]]], lengths: list[int], flat_lp: Tensor,
                 flat_ent: Tensor | None, return_tensors: bool) -> dict[str, Any]:
        lps = list(flat_lp.split(lengths))
        ents = list(flat_ent.split(lengths)) if flat_ent is not None else None
        if not return_tensors:
            out = {"log_probs": [r.tolist() for r in lps], "tokens": [c for _, c in seqs]}
            if ents is not None:
                out["entropy"] = [r.tolist() for r in ents]
            return out
        width = max(lengths, default=0)
        out = {"log_probs": _pad(lps, torch.float32),
               "tokens": _pad([torch.tensor(c, dtype=torch.int64) for _, c in seqs], torch.int64),
               "mask": torch.arange(width) < torch.tensor(lengths, dtype=torch.int64).view(-1, 1)}
        if ents is not None:
            out["entropy"] = _pad(ents, torch.float32)
        return out

    def update_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
        """Replace weights by HF name; all names and shapes are checked before any is
        written. The prefix cache is flushed: K/V computed under old weights never scores."""
        self._check_open()
        if self._workers is not None:
            if not isinstance(weights, Mapping):
                weights = list(weights)  # a generator cannot travel to the workers
            return self._workers.call("update_weights", weights)
        items = self.tp.validated(lambda: self._check_weights(weights))
        weight_map = WeightMap(self.model, write_tied_head=True)
        with torch.no_grad():
            for name, tensor in items:
                weight_map.load(name, tensor)
        self.scheduler.flush()
        self.weight_version += 1

    def _check_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]
                       ) -> list[tuple[str, Tensor]]:
        items = list(weights.items() if isinstance(weights, Mapping) else weights)
        weight_map = WeightMap(self.model, write_tied_head=True)
        for entry in items:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
                raise TypeError(f"weights must map HF names to tensors, got entry {entry!r:.80}")
            weight_map.check(*entry)
        return items

    def stats(self) -> dict[str, Any]:
        self._check_open()
        if self._workers is not None:
            return self._workers.call("stats")
        out = dict(self.scheduler.stats())
        out.update(scored_tokens=self.scored_tokens, weight_version=self.weight_version,
                   page_size=self.config.page_size, kv_cache_tokens=self.kv_cache.num_tokens,
                   tp_size=self.tp.size)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._workers is not None:
            self._workers.shutdown()
            return
        del self.runner, self.kv_cache, self.model, self.scheduler
        if self.config.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
