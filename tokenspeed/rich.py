"""The rich scoring outputs of a call: sampler filters (top_k, top_p, min_p), top_logprobs
and requested-id log-probs. Validates their options (call-wide and per sequence), lays
them out per scored token, collects the head's outputs per batch and packages them per
sequence like the log-probs. A call that asks for none of them never reaches this module
past ``plan``, so the plain path runs unchanged.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .inputs import InvalidSequenceError, token_list
from .layers.sampler_filters import MAX_CANDIDATES, RowOptions, candidate_count

FILTERS = ("top_k", "top_p", "min_p")
DEFAULTS = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}


def check_filter(name: str, value: Any) -> int | float:
    """A top_k / top_p / min_p value, or a ValueError/TypeError saying what is allowed."""
    if name == "top_k":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"top_k must be an int, got {value!r}")
        if not 0 <= value <= MAX_CANDIDATES:
            raise ValueError(f"top_k must be in [0, {MAX_CANDIDATES}], got {value}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if name == "top_p" and not 0.0 < value <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {value!r}")
    if name == "min_p" and not 0.0 <= value < 1.0:  # also rejects nan
        raise ValueError(f"min_p must be in [0, 1), got {value!r}")
    return float(value)


def check_top_logprobs(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"top_logprobs must be an int, got {value!r}")
    if not 0 <= value <= MAX_CANDIDATES:
        raise ValueError(f"top_logprobs must be in [0, {MAX_CANDIDATES}], got {value}")
    return int(value)


def _per_position_ids(index: int, value: Any, positions: int, vocab: int) -> list[list[int]]:
    """One id list for all positions, or one per scored position (ragged)."""
    if isinstance(value, Sequence) and value and all(
            isinstance(v, (Sequence, Tensor)) and not isinstance(v, (str, bytes))
            for v in value):
        if len(value) != positions:
            raise InvalidSequenceError(index, "token_ids", f"token_ids has {len(value)} lists "
                                       f"but the completion scores {positions} positions")
        return [token_list(index, "token_ids", v, vocab) for v in value]
    ids = token_list(index, "token_ids", value, vocab)
    return [ids] * positions


@dataclass
class RichCall:
    """One call's rich options laid out per scored token (host tensors, flat over the
    call's completions) and the outputs collected into the same layout."""
    top_logprobs: int
    top_k: Tensor        # [N] int64
    top_p: Tensor        # [N] fp32
    min_p: Tensor        # [N] fp32
    token_ids: Tensor | None   # [N, n] int64, -1 where a position asks fewer ids
    id_counts: list[int] | None  # ids asked at each of the N positions
    candidates: int
    filtered: bool
    # [N] bool: the positions of sequences that ask nothing of their own (no filter on, no
    # ids) in a call without top_logprobs or call-wide ids, scored as on the plain path;
    # None when there are none
    plain: Tensor | None = None
    top_ids_out: Tensor | None = None
    top_lp_out: Tensor | None = None
    token_lp_out: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.top_k.shape[0]
        if self.top_logprobs:
            self.top_ids_out = torch.full((n, self.top_logprobs), -1, dtype=torch.int64)
            self.top_lp_out = torch.empty(n, self.top_logprobs, dtype=torch.float32)
        if self.token_ids is not None:
            self.token_lp_out = torch.empty(self.token_ids.shape, dtype=torch.float32)

    def fingerprint(self) -> tuple:
        """What the ranks must agree on besides the sequences."""
        ids = None if self.token_ids is None else self.token_ids.tolist()
        return (self.top_logprobs, self.top_k.tolist(), self.top_p.tolist(),
                self.min_p.tolist(), ids)

    def pending_rows(self, plain_rows: int) -> int:
        """Scored rows to hold on the device before a copy-out: the plain bound's bytes
        (8 a row: log-prob and entropy) spread over the rows' extra outputs as well."""
        width = 0 if self.token_ids is None else self.token_ids.shape[1]
        return max(1, plain_rows * 8 // (8 + 12 * self.top_logprobs + 4 * width))

    def store(self, dst: Tensor, extras: dict[str, Tensor]) -> None:
        """Write one copy-out's extra outputs (already on the host) to their slots."""
        if self.top_logprobs:
            self.top_ids_out[dst] = extras["top_ids"]
            self.top_lp_out[dst] = extras["top_logprobs"]
        if self.token_ids is not None:
            # a batch's requested ids are as wide as the widest part in it asks
            self.token_lp_out[dst] = extras["token_logprobs"][:, :self.token_ids.shape[1]]

    def package(self, out: dict[str, Any], lengths: list[int], return_tensors: bool,
                width: int, device: torch.device) -> None:
        """Add "top_logprobs" and "token_ids_logprobs" per sequence to ``out``; as tensors
        [N, width, k] on ``device`` with ``return_tensors``."""
        if self.top_logprobs:
            ids, lps = self.top_ids_out.split(lengths), self.top_lp_out.split(lengths)
            if return_tensors:
                out["top_logprobs"] = {"ids": _pad3(ids, -1, width).to(device),
                                       "logprobs": _pad3(lps, math.nan, width).to(device)}
            else:
                out["top_logprobs"] = [{"ids": i.tolist(), "logprobs": p.tolist()}
                                       for i, p in zip(ids, lps)]
        if self.token_ids is not None:
            lps = self.token_lp_out.split(lengths)
            if return_tensors:
                asked = torch.arange(self.token_ids.shape[1]) < \
                    torch.tensor(self.id_counts).view(-1, 1)
                padded = torch.where(asked, self.token_lp_out, math.nan).split(lengths)
                out["token_ids_logprobs"] = _pad3(padded, math.nan, width).to(device)
            else:
                counts = iter(self.id_counts)
                out["token_ids_logprobs"] = [[row[:next(counts)] for row in seq.tolist()]
                                             for seq in lps]


def row_options(runs: Sequence[tuple[RichCall | None, Tensor]], device: torch.device
                ) -> RowOptions | None:
    """The options of a batch's scored rows, which come in runs of one call (or session
    part) each: ``runs`` holds each run's RichCall (None: a call that asked for nothing
    beyond plain log-probs, whose rows take the defaults: no filter, no ids) and its rows'
    flat output slots. None when no run has a RichCall, or when every row is plain and the
    batch asks no extra output: the plain path. top_logprobs is a call-wide option, so
    every RichCall of a batch has the same. The rows of runs without one, and a RichCall's
    ``plain`` rows, are listed as ``plain`` (the rest as ``rich``): the head scores them as
    on the plain path, so a sequence that asks nothing beyond log-probs scores the same
    whatever rich rows share its batches or its call, and only the rich rows take the rich
    pass."""
    calls = [rich for rich, _ in runs if rich is not None]
    if not calls:
        return None
    width = max((r.token_ids.shape[1] for r in calls if r.token_ids is not None),
                default=None)
    top_k, top_p, min_p, ids, plain = [], [], [], [], []  # plain: [n] bool a run
    for rich, dst in runs:
        n = len(dst)
        if rich is None:
            plain.append(torch.ones(n, dtype=torch.bool))
            top_k.append(torch.full((n,), DEFAULTS["top_k"], dtype=torch.int64))
            top_p.append(torch.full((n,), DEFAULTS["top_p"], dtype=torch.float32))
            min_p.append(torch.full((n,), DEFAULTS["min_p"], dtype=torch.float32))
        else:
            plain.append(torch.zeros(n, dtype=torch.bool) if rich.plain is None
                         else rich.plain[dst])
            top_k.append(rich.top_k[dst])
            top_p.append(rich.top_p[dst])
            min_p.append(rich.min_p[dst])
        if width is not None:
            own = (torch.empty(n, 0, dtype=torch.int64)
                   if rich is None or rich.token_ids is None else rich.token_ids[dst])
            ids.append(torch.nn.functional.pad(own, (0, width - own.shape[1]), value=-1))
    is_plain = torch.cat(plain)
    plain_rows = is_plain.nonzero()[:, 0]
    if width is None and not calls[0].top_logprobs and len(plain_rows) == len(is_plain):
        return None  # every row is plain and no row asks an extra output: the plain path

    def on_device(t: Tensor) -> Tensor:
        return t.to(device, non_blocking=True)

    def rows(parts: list[Tensor]) -> Tensor:
        return on_device(torch.cat(parts))
    plain_out = rich_out = None
    if len(plain_rows):
        plain_out = on_device(plain_rows)
        rich_rows = (~is_plain).nonzero()[:, 0]
        rich_out = on_device(rich_rows) if len(rich_rows) else None
    return RowOptions(rows(top_k), rows(top_p), rows(min_p), calls[0].top_logprobs,
                      None if width is None else rows(ids),
                      max(r.candidates for r in calls), any(r.filtered for r in calls),
                      plain_out, rich_out)


def _pad3(parts: Sequence[Tensor], fill: float, width: int) -> Tensor:
    """Per-sequence [n_i, k] -> [N, width, k] padded with ``fill``."""
    k = parts[0].shape[1] if parts else 0
    out = torch.full((len(parts), width, k), fill, dtype=parts[0].dtype if parts else
                     torch.float32)
    for i, p in enumerate(parts):
        out[i, :p.shape[0]] = p
    return out


def plan(sequences: Sequence[Mapping[str, Any]], seqs: list[tuple[list[int], list[int]]],
         vocab: int, options: Mapping[str, Any]) -> RichCall | None:
    """Validate the rich options (call-wide ``options`` with keys top_k, top_p, min_p,
    top_logprobs, token_ids; per-sequence top_k, top_p, min_p, token_ids) and lay them out
    per scored token; None when the call asks for nothing beyond plain log-probs."""
    call = {name: check_filter(name, options.get(name, DEFAULTS[name])) for name in FILTERS}
    top_logprobs = check_top_logprobs(options.get("top_logprobs", 0))
    call_ids = options.get("token_ids")
    if call_ids is not None:
        try:
            call_ids = token_list(-1, "token_ids", call_ids, vocab)
        except InvalidSequenceError as e:
            raise ValueError(e.detail) from None
    per_seq = {name: [] for name in FILTERS}
    # the ids asked at each scored position, laid out only where some are asked
    ids: list[list[int]] = []
    any_ids = call_ids is not None or any("token_ids" in item for item in sequences)
    for i, (item, (_, completion)) in enumerate(zip(sequences, seqs)):
        for name in FILTERS:
            value = call[name]
            if name in item:  # the call's own values are checked above
                try:
                    value = check_filter(name, item[name])
                except (TypeError, ValueError) as e:
                    raise InvalidSequenceError(i, name, str(e)) from None
            per_seq[name].append(value)
        if not any_ids:
            continue
        if "token_ids" in item:
            ids += _per_position_ids(i, item["token_ids"], len(completion), vocab)
        else:
            ids += [call_ids or []] * len(completion)
    filter_on = [k != 0 or p < 1.0 or m > 0.0 for k, p, m in
                 zip(per_seq["top_k"], per_seq["top_p"], per_seq["min_p"])]
    filtered = any(filter_on)
    if not (filtered or top_logprobs or any_ids):
        return None
    lengths = [len(c) for _, c in seqs]

    def flat(values: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype).repeat_interleave(
            torch.tensor(lengths, dtype=torch.int64))

    token_ids = None
    if any_ids:
        width = max((len(r) for r in ids), default=0)
        token_ids = torch.full((len(ids), width), -1, dtype=torch.int64)
        for r, row in enumerate(ids):
            token_ids[r, :len(row)] = torch.tensor(row, dtype=torch.int64)
    open_filter = any(on and k == 0 for on, k in zip(filter_on, per_seq["top_k"]))
    plain = None
    if not top_logprobs and call_ids is None:
        asks_nothing = [not on and "token_ids" not in item
                        for item, on in zip(sequences, filter_on)]
        if any(asks_nothing):
            plain = flat(asks_nothing, torch.bool)
    return RichCall(top_logprobs, flat(per_seq["top_k"], torch.int64),
                    flat(per_seq["top_p"], torch.float32), flat(per_seq["min_p"], torch.float32),
                    token_ids, [len(r) for r in ids] if any_ids else None,
                    candidate_count(top_logprobs, max(per_seq["top_k"], default=0),
                                    open_filter), filtered, plain)
