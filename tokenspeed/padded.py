"""Padded layouts as trainers hold them, to and from the engine's (prompt, completion) lists.

A trainer keeps a batch as ``[B, L]`` tensors: ``input_ids``, an ``attention_mask`` (1 on
real tokens, 0 on padding, left or right) and a ``response_mask`` (1 on the tokens to
score). Each row's prompt is its attended tokens before the response run and its
completion is the run itself; scores come back ``[B, L]`` on the engine's device, aligned
with ``input_ids`` and 0 wherever the response mask is 0. Positions count attended tokens
only, as HF's padded forward does with ``position_ids`` taken from the mask.

Everything here reads the caller's tensors back to the host once per call (the scheduler
needs the ids there), never once per row.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .inputs import KEYS, integer_dtype

# output keys that are not per-token scores: they are not scattered into [B, L]
NOT_SCORES = ("tokens", "mask")


def _as_mask(name: str, mask: Any, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, input_ids {shape}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must hold 0/1 (bool or numbers), got {mask.dtype}")
    return mask


def _ids(name: str, ids: Any) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(ids).__name__}")
    if ids.dim() != 2 or not integer_dtype(ids):
        raise TypeError(f"{name} must be a [B, L] integer tensor, got {ids.dtype} of shape "
                        f"{tuple(ids.shape)}")
    return ids


def padded_sequences(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor
                     ) -> tuple[list[dict[str, list[int]]], Tensor]:
    """The engine's sequences of the rows with a response, and the response mask as a
    host bool tensor [B, L]. Raises ValueError naming the first malformed row."""
    input_ids = _ids("input_ids", input_ids)
    shape = tuple(input_ids.shape)
    masks = {"attention_mask": _as_mask("attention_mask", attention_mask, shape),
             "response_mask": _as_mask("response_mask", response_mask, shape)}
    # one read-back for the ids, both masks and whether each mask entry is 0 or 1 (worked
    # out where the mask lives: 0.5 must not pass as 0)
    device = input_ids.device
    parts = [input_ids.to(torch.int64)]
    for m in masks.values():
        parts += [(m != 0).to(device, torch.int64), ((m == 0) | (m == 1)).to(device, torch.int64)]
    ids, attn, attn_ok, resp, resp_ok = torch.stack(parts).cpu().unbind(0)
    for (name, m), ok in zip(masks.items(), (attn_ok, resp_ok)):
        if not ok.all():
            b, i = (ok == 0).nonzero()[0].tolist()
            raise ValueError(f"{name}[{b}, {i}] is {m[b, i].item()}; masks hold 0 or 1")
    attn, resp = attn.bool(), resp.bool()
    width = shape[1]
    pos = torch.arange(width)
    count = resp.sum(1)
    has = count > 0
    first = torch.where(has, resp.int().argmax(1), width)
    last = torch.where(has, width - 1 - resp.int().flip(1).argmax(1), -1)
    prompt = attn & (pos < first[:, None])
    after = attn & (pos > last[:, None]) & has[:, None]
    # each check over every row at once; the first row that fails names the error
    for bad, message in (
            (resp & ~attn, lambda b, i: f"response token at position {i} is padding "
                                        f"(attention_mask 0 there)"),
            (has[:, None] & (pos >= first[:, None]) & (pos <= last[:, None]) & ~resp,
             lambda b, i: f"the response has a gap at position {i}; it must be one "
                          f"contiguous run of positions {int(first[b])}..{int(last[b])}"),
            (after, lambda b, i: f"attended token at position {i} after the response run "
                                 f"{int(first[b])}..{int(last[b])}; the response must end "
                                 f"the row's tokens"),
            ((has & ~prompt.any(1))[:, None] & (pos == first[:, None]),
             lambda b, i: f"the response starts at position {i} with no attended prompt "
                          f"token before it")):
        if bad.any():
            b, i = bad.nonzero()[0].tolist()
            raise ValueError(f"row {b}: {message(b, i)}")
    prompt &= has[:, None]
    prompt_ids, response_ids = ids[prompt].tolist(), ids[resp].tolist()
    seqs, p_at, r_at = [], 0, 0
    for p, r in zip(prompt.sum(1).tolist(), count.tolist()):
        if r:
            seqs.append({KEYS[0]: prompt_ids[p_at:p_at + p],
                         KEYS[1]: response_ids[r_at:r_at + r]})
        p_at, r_at = p_at + p, r_at + r
    return seqs, resp


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without waiting for the device: a pageable copy to a
    GPU synchronises, a pinned non-blocking one does not (the caching host allocator
    keeps the pinned buffer until its copy has run)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def flat_index(mask: Tensor) -> Tensor:
    """Row-major positions of a host bool mask's True entries (int64, host), so device
    tensors are indexed with integers: a bool mask index on a GPU waits for its count."""
    return mask.reshape(-1).nonzero().view(-1)


def pad_flat(flat: Tensor, index: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Rows laid end to end [n, ...] -> ``shape`` [R, W, ...], zeros elsewhere: one
    index_copy where ``flat`` lives, ``index`` (on that device) the flat_index of the
    entries."""
    out = flat.new_zeros(shape)
    out.view(-1, *shape[2:]).index_copy_(0, index, flat)
    return out


def scatter_scores(result: Mapping[str, Any], response: Tensor, device: torch.device
                   ) -> dict[str, Any]:
    """compute_log_probs(return_tensors=True) output of the rows with a response -> every
    per-token output [B, L, ...] on ``device``, 0 off the response; other keys as they are.
    ``response`` is the host bool mask; the row-major order of its entries is the order
    of the result's rows and their first entries."""
    counts = response.sum(1)
    width = result["mask"].shape[1]
    valid = torch.arange(width) < counts[counts > 0].view(-1, 1)
    src = to_device(flat_index(valid), device)
    dst = to_device(flat_index(response), device)
    out: dict[str, Any] = {}
    for key, value in result.items():
        if key in NOT_SCORES:
            continue
        if isinstance(value, Tensor) and value.shape[:2] == valid.shape:
            rows = value.reshape(-1, *value.shape[2:]).index_select(0, src)
            out[key] = pad_flat(rows, dst, (*response.shape, *value.shape[2:]))
        else:
            out[key] = value
    return out


def padding_mask(lengths: Sequence[int], width: int) -> Tensor:
    """[len(lengths), width] host bool, True on each row's first lengths[i] entries."""
    return torch.arange(width) < torch.tensor(lengths, dtype=torch.int64).view(-1, 1)


def check_pad_to(pad_to: Any, return_tensors: bool, lengths: Sequence[int]) -> int:
    """The padded width: ``pad_to`` when given (it must hold the longest completion)."""
    longest = max(lengths, default=0)
    if pad_to is None:
        return longest
    if not return_tensors:
        raise ValueError("pad_to applies to tensors; pass return_tensors=True with it")
    if isinstance(pad_to, bool) or not isinstance(pad_to, int):
        raise TypeError(f"pad_to must be an int, got {pad_to!r}")
    if pad_to < longest:
        raise ValueError(f"pad_to is {pad_to}, but the longest completion has {longest} tokens")
    return pad_to


def ids_to_host(sequences: Any) -> Any:
    """``sequences`` with every id tensor on a device read back to the host in one copy
    per device (the scheduler needs ids on the host; reading each back on its own would
    wait for the device once per sequence). Anything malformed is passed on untouched,
    for validation to name."""
    if isinstance(sequences, (str, bytes, Mapping)) or not isinstance(sequences, Sequence):
        return sequences
    found: dict[torch.device, list[tuple[int, str, Tensor]]] = {}
    for i, item in enumerate(sequences):
        if not isinstance(item, Mapping):
            continue
        for key in KEYS:
            t = item.get(key)
            if isinstance(t, Tensor) and t.device.type != "cpu" and t.dim() == 1 \
                    and integer_dtype(t):
                found.setdefault(t.device, []).append((i, key, t))
    if not found:
        return sequences
    out = [dict(item) if isinstance(item, Mapping) else item for item in sequences]
    for entries in found.values():
        host = torch.cat([t.to(torch.int64) for *_, t in entries]).cpu()
        for (i, key, _), part in zip(entries, host.split([t.numel() for *_, t in entries])):
            out[i][key] = part
    return out
