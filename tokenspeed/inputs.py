"""Validation of what callers hand the engine: sequences and call options.

Everything here runs before any state changes, so a rejected call changes nothing. A
bad sequence raises ``InvalidSequenceError``, which says which sequence and which field
was wrong, so front ends (the CLI, a server) can map it to their own line or item.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

KEYS = ("prompt_token_ids", "completion_token_ids")
# Below this, logits / temperature overflows fp32 for ordinary logits (|x| > ~3e32 * T)
# and log-probs turn into NaN; rollout samplers treat such temperatures as greedy anyway.
MIN_TEMPERATURE = 1e-6


class InvalidSequenceError(ValueError, TypeError):
    """Sequence ``index`` of a call is malformed: ``field`` (None when the sequence as a
    whole is wrong) and ``detail`` say how. It is both a ValueError and a TypeError, so
    callers catching either, as they would for a plain argument error, still catch it."""

    def __init__(self, index: int, field: str | None, detail: str):
        super().__init__(f"sequence {index}: {detail}")
        self.index, self.field, self.detail = index, field, detail

    def __reduce__(self):  # crosses process boundaries (tensor-parallel workers) intact
        return type(self), (self.index, self.field, self.detail)


@dataclass(frozen=True)
class Limits:
    """What the engine can hold: vocabulary, positions, KV pool and its page size."""
    vocab_size: int
    max_positions: int
    pool_tokens: int
    page_size: int


def token_list(index: int, key: str, value: Any, vocab: int) -> list[int]:
    """The ids of one field as a list of int, or an InvalidSequenceError naming them."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or not integer_dtype(value):
            raise InvalidSequenceError(index, key, f"{key} must be a 1-D integer tensor, got "
                                                   f"{value.dtype} of shape {tuple(value.shape)}")
        value = value.tolist()
    elif isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidSequenceError(index, key, f"{key} must be a list of ints, "
                                               f"got {type(value).__name__}")
    tokens = value if isinstance(value, list) else list(value)
    if _first_bad_id()(tokens, vocab) < 0:  # the usual list of plain ids, in one C++ pass
        return tokens
    if set(map(type, tokens)) - {int}:
        for j, t in enumerate(tokens):
            if not _scalar_int(t):
                raise InvalidSequenceError(index, key, f"{key}[{j}] is {t!r} "
                                                       f"({type(t).__name__}), not an int")
        tokens = [int(t) for t in tokens]
    if tokens and (min(tokens) < 0 or max(tokens) >= vocab):
        j = next(j for j, t in enumerate(tokens) if not 0 <= t < vocab)
        raise InvalidSequenceError(index, key, f"{key}[{j}] is {tokens[j]}, "
                                               f"vocabulary is [0, {vocab})")
    return tokens


@functools.cache
def _first_bad_id() -> Callable[[list, int], int]:
    # the scheduler's module, built on first use like the engine's scheduler (imported
    # here, not at the top, so front ends importing this module's errors build nothing)
    from tokenspeed_ext import scheduler_module
    return scheduler_module.first_bad_id


def integer_dtype(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex) and t.dtype != torch.bool


def _scalar_int(value: Any) -> bool:
    """An int, a numpy integer or a 0-d integer tensor; never a bool."""
    if isinstance(value, Tensor):
        return value.dim() == 0 and integer_dtype(value)
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ValueError(f"temperature must be finite and >= {MIN_TEMPERATURE:g}, "
                         f"got {temperature!r}")
    return float(temperature)


def validate_sequences(sequences: Any, limits: Limits) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) id lists of every sequence, or the first sequence's error."""
    if isinstance(sequences, (str, bytes, Mapping)) or not isinstance(sequences, Sequence):
        raise TypeError(f"sequences must be a list of dicts, got {type(sequences).__name__}")
    out = []
    # a field object seen earlier in the call (a prompt shared by a group of completions,
    # as GRPO batches have it) is checked once: the call holds every field alive, so an
    # id names one object throughout, and only fields that passed are remembered
    seen: dict[int, list[int]] = {}

    def field(i: int, key: str, value: Any) -> list[int]:
        tokens = seen.get(id(value))
        if tokens is None:
            tokens = seen[id(value)] = token_list(i, key, value, limits.vocab_size)
        return tokens

    for i, item in enumerate(sequences):
        if not isinstance(item, Mapping):
            raise InvalidSequenceError(i, None, f"expected a dict with {KEYS}, "
                                                f"got {type(item).__name__}")
        for key in KEYS:
            if key not in item:
                raise InvalidSequenceError(i, key, f"missing key {key!r}")
        prompt = field(i, KEYS[0], item[KEYS[0]])
        completion = field(i, KEYS[1], item[KEYS[1]])
        if not prompt:
            raise InvalidSequenceError(i, KEYS[0], "empty prompt (the first completion "
                                                   "token needs at least one token before it)")
        length = len(prompt) + len(completion)
        if length > limits.max_positions:
            raise InvalidSequenceError(i, None, f"length {length} exceeds the model's "
                                                f"max_position_embeddings {limits.max_positions}")
        page = limits.page_size
        if completion and -(-length // page) * page > limits.pool_tokens:
            raise InvalidSequenceError(i, None, f"length {length} does not fit the KV pool of "
                                                f"{limits.pool_tokens} tokens "
                                                f"(raise kv_cache_tokens)")
        out.append((prompt, completion))
    return out
