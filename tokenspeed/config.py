"""EngineConfig: every engine setting, validated and normalised on construction."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .models.loader import InMemoryCheckpoint

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
          "fp32": torch.float32, "float": torch.float32}


LEAN_VOCAB_CHUNK_CUDA = 32768
LOGPROB_MODES = ("partials", "gather")


def resolve_device(device: str | torch.device | None, default_index: int | None = None
                   ) -> torch.device:
    """``default_index`` picks the GPU when none is named (a rank's LOCAL_RANK)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but torch sees no CUDA device")
        if device.index is None:
            index = torch.cuda.current_device() if default_index is None else default_index
            device = torch.device("cuda", index)
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclass
class EngineConfig:
    """``device``/``dtype`` accept strings or torch objects and become torch objects.

    kv_cache_tokens: size of the paged K/V pool in tokens; None sizes it from free GPU
    memory after one measured batch (CUDA) or a fixed memory budget (CPU).
    lean_vocab_chunk: vocabulary chunk of the log-prob head's lean mode, or None for
    whole logit rows (a bounded number of rows at a time). "auto" picks what measured
    faster (bench/NOTES.md, "Lean head"): whole rows on the CPU, chunks of 32768 on CUDA.
    On CUDA it shapes only the sampler outputs' and deterministic mode's head: plain
    scores there come from head_logprob_partials, which never writes logits.

    tp_size > 1: tensor parallelism (see tokenspeed/parallel). Each rank then scores its whole
    vocabulary shard in bounded row blocks (lean_vocab_chunk applies at tp_size 1), and
    logprob_mode picks the exchange: "partials" ([T, 4] fp32 per rank) or "gather" (the
    logits themselves, [T, V / tp] per rank).

    deterministic: every score is bitwise the same whatever else the call holds, its
    order, max_batch_tokens, max_batch_requests, page size, prefix-cache hits, evictions
    and earlier calls (for given weights, dtype, device type and tp_size): every matrix
    product runs on fixed row blocks (layers/gemm.py), MoE experts on a grouped GEMM whose
    sums run in an order fixed by K (layers/moe.py), and tensor-parallel sums add the
    ranks in order. The default mode keeps most of these invariances by how its kernels
    are built, but not across GEMM shapes (docs/design.md, "Determinism").

    check_batches: every forward checks its batch before using it: layer 0 checks the
    slots, page table and sequence lengths against the KV pool and the head checks the
    targets against the vocabulary. Each check reads values back to the host, so the
    host waits for the device every batch; the scheduler's batches need none of it, so
    this is for debugging. Off, the ops trust the batch: a bad slot or page goes
    unnoticed and a bad target scores -inf.
    """
    model_path: str | Path | InMemoryCheckpoint
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    page_size: int = 16
    max_batch_tokens: int = 8192
    max_batch_requests: int = 256
    kv_cache_tokens: int | None = None
    enable_prefix_cache: bool = True
    tp_size: int = 1
    lean_vocab_chunk: int | None | str = "auto"
    logprob_mode: str = "partials"
    deterministic: bool = False
    check_batches: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model_path, InMemoryCheckpoint):
            self.model_path = Path(self.model_path)
        if isinstance(self.model_path, Path) and not self.model_path.is_dir():
            raise FileNotFoundError(f"model directory {self.model_path} does not exist")
        _positive_int("tp_size", self.tp_size)
        rank_gpu = int(os.environ.get("LOCAL_RANK", 0)) if self.tp_size > 1 else None
        self.device = resolve_device(self.device, rank_gpu)
        self.dtype = resolve_dtype(self.dtype, self.device)
        if self.lean_vocab_chunk == "auto":
            self.lean_vocab_chunk = LEAN_VOCAB_CHUNK_CUDA if self.device.type == "cuda" else None
        for name in ("page_size", "max_batch_tokens", "max_batch_requests"):
            _positive_int(name, getattr(self, name))
        for name in ("kv_cache_tokens", "lean_vocab_chunk"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("enable_prefix_cache", "deterministic", "check_batches"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.logprob_mode not in LOGPROB_MODES:
            raise ValueError(f"logprob_mode must be one of {LOGPROB_MODES}, "
                             f"got {self.logprob_mode!r}")
