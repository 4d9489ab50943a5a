"""tokenspeed_ext: the compiled core of tokenspeed as PyTorch ops.

Importing this package builds the C++/CUDA library on first use (see _build.py) and
registers ``torch.ops.tokenspeed.*``. The scheduler module builds on first access of
``tokenspeed_ext.Scheduler``.
"""
from __future__ import annotations

from . import reference
from .ops import (
    BUILD,
    combine_logprob_partials,
    logprob_partials,
    logprobs,
    paged_prefill_attention,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
    store_kv,
)

__all__ = [
    "BUILD",
    "Scheduler",
    "combine_logprob_partials",
    "logprob_partials",
    "logprobs",
    "paged_prefill_attention",
    "reference",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv",
]


def __getattr__(name: str):
    if name in ("Scheduler", "scheduler_module"):
        from ._build import load_scheduler
        module = load_scheduler()
        return module if name == "scheduler_module" else module.Scheduler
    raise AttributeError(f"module 'tokenspeed_ext' has no attribute {name!r}")
