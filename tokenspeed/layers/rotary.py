"""Rotary position embedding on explicit positions, with the scalings HF models ship.

Inverse frequencies follow transformers' ``modeling_rope_utils`` (default, linear,
llama3, yarn) so that fp32 results match HF to rounding; cos/sin come from one fp32 table
built at load and indexed by the packed positions, so any chunk of any request rotates
exactly as a full pass would.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from tokenspeed_ext import rotary_embedding

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _base_inv_freq(theta: float, dim: int) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: Tensor, p: dict[str, Any]) -> Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(theta: float, dim: int, p: dict[str, Any], max_positions: int) -> tuple[Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def cos_sin_table(inv_freq: Tensor, max_positions: int, attention_factor: float) -> Tensor:
    """[max_positions, D] fp32: cos | sin of position * inv_freq, scaled by yarn's factor."""
    angles = torch.arange(max_positions, device=inv_freq.device).float().unsqueeze(-1) \
        * inv_freq.unsqueeze(0)
    return torch.cat((angles.cos() * attention_factor, angles.sin() * attention_factor),
                     dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, params: dict[str, Any], max_positions: int):
        super().__init__()
        rope_type, theta = params["rope_type"], float(params["rope_theta"])
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        self.attention_factor = 1.0
        inv_freq = _base_inv_freq(theta, head_dim)
        if rope_type == "linear":
            inv_freq = inv_freq / params["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3(inv_freq, params)
        elif rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn(theta, head_dim, params, max_positions)
        # kept fp32 whatever the model dtype: bf16 frequencies cost HF-level accuracy
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # cos | sin of every position the model accepts, fp32 ([max_positions, D]: 16 MB
        # at 32k x 128); the op rounds them to the model dtype as HF's cos/sin cast does.
        self.register_buffer("cos_sin_cache",
                             cos_sin_table(inv_freq, max_positions, self.attention_factor),
                             persistent=False)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> None:
        """Rotates q [N, Hq, D] and k [N, Hk, D] in place (they may be views into the fused
        qkv output). Positions come from the scheduler, below max_position_embeddings by
        the engine's length check, so the op's range check (a host round trip) is off."""
        rotary_embedding(positions, q, k, self.cos_sin_cache, validate=False)
