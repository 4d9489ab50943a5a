"""Agreement between two sets of per-token log-probs: the numbers RL trainers watch.

``reference`` and ``candidate`` score the same tokens (for example the rollout engine's
log-probs and the trainer's, or two engines'). With delta = candidate - reference per
token:

- ``mean_abs_diff`` / ``max_abs_diff``: mean and max of |delta|;
- ``kl_k3``: the k3 estimator of KL(reference || candidate) over tokens drawn from the
  reference, mean of exp(delta) - 1 - delta (never negative, unbiased);
- ``mean_prob_ratio_error``: mean of exp(|delta|), the multiplicative error of a token's
  probability (1 when they agree).

Tokens scored -inf by both agree (delta 0); by one only, the differences are infinite.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

METRICS = ("mean_abs_diff", "max_abs_diff", "kl_k3", "mean_prob_ratio_error")


def _deltas(reference: Any, candidate: Any, mask: Any) -> list[Tensor]:
    """Per sequence, the float64 deltas of its counted tokens."""
    if isinstance(reference, Tensor) or isinstance(candidate, Tensor):
        ref, cand = torch.as_tensor(reference), torch.as_tensor(candidate)
        if ref.shape != cand.shape or ref.dim() != 2:
            raise ValueError(f"padded log-probs must both be [B, L], got {tuple(ref.shape)} "
                             f"and {tuple(cand.shape)}")
        keep = torch.ones_like(ref, dtype=torch.bool) if mask is None else \
            torch.as_tensor(mask, device=ref.device).bool()
        if keep.shape != ref.shape:
            raise ValueError(f"mask is {tuple(keep.shape)}, log-probs are {tuple(ref.shape)}")
        rows = [(r[k], c[k]) for r, c, k in zip(ref.double().cpu(), cand.double().cpu(),
                                                keep.cpu())]
    else:
        if mask is not None:
            raise ValueError("mask applies to padded tensors; ragged lists hold only "
                             "scored tokens")
        if len(reference) != len(candidate):
            raise ValueError(f"reference has {len(reference)} sequences, candidate "
                             f"{len(candidate)}")
        rows = []
        for i, (r, c) in enumerate(zip(reference, candidate)):
            if len(r) != len(c):
                raise ValueError(f"sequence {i}: reference has {len(r)} tokens, candidate "
                                 f"{len(c)}")
            rows.append((torch.tensor(r, dtype=torch.float64),
                         torch.tensor(c, dtype=torch.float64)))
    out = []
    for i, (r, c) in enumerate(rows):
        if torch.isnan(r).any() or torch.isnan(c).any():
            raise ValueError(f"sequence {i}: a log-prob is NaN")
        both_filtered = torch.isneginf(r) & torch.isneginf(c)
        out.append(torch.where(both_filtered, torch.zeros_like(r), c - r))
    return out


def _summary(delta: Tensor) -> dict[str, float]:
    if delta.numel() == 0:
        return dict.fromkeys(METRICS, math.nan)
    absolute = delta.abs()
    return {"mean_abs_diff": absolute.mean().item(), "max_abs_diff": absolute.max().item(),
            "kl_k3": (torch.expm1(delta) - delta).mean().item(),
            "mean_prob_ratio_error": absolute.exp().mean().item()}


def agreement(reference: Sequence[Sequence[float]] | Tensor,
              candidate: Sequence[Sequence[float]] | Tensor,
              mask: Tensor | None = None) -> dict[str, Any]:
    """The metrics over all tokens, plus ``per_sequence`` (one dict each) and ``tokens``.

    Either ragged lists (one list of log-probs per sequence, as compute_log_probs returns)
    or padded [B, L] tensors with an optional bool ``mask`` of the positions to count.
    A sequence with no token has NaN metrics.
    """
    deltas = _deltas(reference, candidate, mask)
    everything = torch.cat(deltas) if deltas else torch.zeros(0, dtype=torch.float64)
    return {**_summary(everything), "tokens": everything.numel(),
            "per_sequence": [_summary(d) for d in deltas]}
