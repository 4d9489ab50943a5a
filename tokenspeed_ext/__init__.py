"""tokenspeed_ext: the compiled core of tokenspeed as PyTorch ops.

The op library and the scheduler are two JIT-built shared objects (see _build.py), each
built and loaded on first use: touching an op wrapper (``tokenspeed_ext.logprobs``, ...)
or ``BUILD`` builds and registers ``torch.ops.tokenspeed.*`` (``import
tokenspeed_ext.ops`` does it explicitly); ``tokenspeed_ext.Scheduler`` builds only the
scheduler, which needs no kernels.
"""
from __future__ import annotations

import importlib

from . import reference

OPS = ("BUILD", "combine_logprob_partials", "filter_kept_set", "grouped_gemm",
       "head_logprob_partials", "logprob_mass_above", "logprob_partials", "logprob_topk_partials", "logprobs",
       "moe_combine", "moe_dispatch", "moe_route", "paged_prefill_attention", "rms_norm",
       "rotary_embedding", "silu_and_mul", "store_kv")

__all__ = [*OPS, "Scheduler", "reference", "scheduler_module"]


def __getattr__(name: str):
    if name in OPS:
        return getattr(importlib.import_module(".ops", __name__), name)
    if name in ("Scheduler", "scheduler_module"):
        from ._build import load_scheduler
        module = load_scheduler()
        return module if name == "scheduler_module" else module.Scheduler
    raise AttributeError(f"module 'tokenspeed_ext' has no attribute {name!r}")
