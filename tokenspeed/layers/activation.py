"""SiLU-gated MLP activation over a fused [N, 2 * I] gate_up tensor."""
from __future__ import annotations

from tokenspeed_ext import silu_and_mul

__all__ = ["silu_and_mul"]
