"""Weights from a training process: broadcast over a process group shared with the trainer,
or CUDA IPC handles for a trainer on the same GPU(s). Both ends live here, so they match.

Broadcast protocol, one update (trainer = rank ``src``, every engine TP rank a receiver):

1. Every rank checks the update's (names, dtypes, shapes) (the engine against its model,
   the trainer against its tensors) and all ranks agree: one all-reduce of (failed,
   digest of the lists and bucket size). If any rank failed or the lists differ, every
   rank raises here; nothing has moved.
2. The tensors travel in buckets of ``bucket_bytes`` (a larger tensor travels alone), each
   one flat byte buffer broadcast from the trainer. The engine stages every tensor and
   checks its values (NaN/inf) as it arrives, but keeps receiving after a failure, so
   the ranks stay in step.
3. A second agreement: if any rank failed, every rank raises and the engine drops the
   staged tensors, keeping its old weights and cache. Only then does the engine write
   them, through the same write as ``update_weights``.

So a rejected update leaves the old weights on every rank, at the price of staging the
whole update: a full Qwen2.5-7B in bf16 stages 15 GB on each engine rank (on the GPU for
NCCL, in host memory for gloo). A transfer that stops half-way for any other reason (an
interrupt, a lost peer) leaves the group out of step: it is marked broken and must be
created again; the weights are the old ones.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEFAULT_BUCKET_BYTES = 1 << 30
BACKENDS = ("nccl", "gloo")
# byte alignment of each tensor in a bucket: any dtype's view of it is aligned
ALIGN = 16
Meta = list[tuple[str, torch.dtype, tuple[int, ...]]]


class SyncGroup:
    """One process's membership of a weight-sync group: its rank, the group's size, the
    device its collectives' tensors live on (cuda for NCCL) and the process group itself,
    built over its own TCP store rendezvous, apart from any default or TP group."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 backend: str, device: torch.device, timeout: timedelta):
        self.rank, self.size, self.device = rank, world_size, device
        self.broken = False
        # the store must outlive the group: rank 0's process serves it
        self._store = dist.TCPStore(master_address, master_port, world_size,
                                    is_master=rank == 0, timeout=timeout)
        store = dist.PrefixStore("tokenspeed-weight-sync", self._store)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, options)

    def broadcast(self, tensor: Tensor, src: int) -> None:
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = src, 0
        self.pg.broadcast([tensor], options).wait()

    def agree(self, failed: bool, digest: int) -> tuple[bool, bool]:
        """(did any rank fail, were all ranks given the same update)."""
        # MAX of digest and of -digest: equal digests iff max == -max(-d)
        state = torch.tensor([int(failed), digest, -digest], dtype=torch.int64,
                             device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MAX
        self.pg.allreduce([state], options).wait()
        flags = state.tolist()
        return bool(flags[0]), flags[1] == -flags[2]

    @contextmanager
    def transfer(self) -> Iterator[None]:
        """One update's collectives, all or none: anything that escapes half-way (an
        interrupt, a lost peer, a device error) leaves the ranks out of step, so the group
        is marked broken."""
        if self.broken:
            raise RuntimeError("the weight-sync group broke when a transfer stopped half-way "
                               "(interrupt or lost peer); create it again on every rank")
        try:
            yield
        except BaseException:
            self.broken = True
            raise


def init_weight_sync_group(master_address: str, master_port: int, rank: int, world_size: int,
                           backend: str = "nccl", device: torch.device | str | None = None,
                           timeout_s: float = 1800.0) -> SyncGroup:
    """Join the weight-sync group as ``rank`` (the trainer is rank 0; the engine's TP ranks
    follow). Blocks until all ``world_size`` ranks joined. ``device``: where the
    collectives' tensors live; NCCL needs the current CUDA device (the default)."""
    if not isinstance(master_address, str) or not master_address:
        raise TypeError(f"master_address must be a host name or address, got {master_address!r}")
    for name, value, low in (("master_port", master_port, 1), ("world_size", world_size, 2),
                             ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if rank >= world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")
    device = torch.device(device)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the nccl backend needs a CUDA device, got {device}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    return SyncGroup(master_address, master_port, rank, world_size, backend, device,
                     timedelta(seconds=timeout_s))


def _dtype(index: int, value: Any) -> torch.dtype:
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"dtypes[{index}] must be a floating torch.dtype (or its name), "
                        f"got {value!r}")
    return value


def update_metadata(names: Sequence[str], dtypes: Sequence[Any],
                    shapes: Sequence[Sequence[int]]) -> Meta:
    """The (name, dtype, shape) of each tensor of an update, checked."""
    for what, value in (("names", names), ("dtypes", dtypes), ("shapes", shapes)):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise TypeError(f"{what} must be a list, got {type(value).__name__}")
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names, dtypes and shapes must have one entry per tensor, got "
                         f"{len(names)}, {len(dtypes)} and {len(shapes)}")
    meta = []
    for i, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):
        if not isinstance(name, str):
            raise TypeError(f"names[{i}] must be a str, got {name!r}")
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
            raise TypeError(f"shapes[{i}] ({name!r}) must be a list of ints, got {shape!r}")
        dims = tuple(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise ValueError(f"shapes[{i}] ({name!r}) must hold sizes >= 0, got {shape!r}")
        meta.append((name, _dtype(i, dtype), dims))
    return meta


def metadata_of(weights: Iterable[tuple[str, Tensor]]) -> tuple[list[str], list[torch.dtype],
                                                                 list[list[int]]]:
    """(names, dtypes, shapes) of named tensors: what the trainer hands the engine's
    ``update_weights_from_distributed`` while it calls ``send_weights``."""
    items = list(weights)
    return ([n for n, _ in items], [t.dtype for _, t in items],
            [list(t.shape) for _, t in items])


def _digest(meta: Meta, bucket_bytes: int) -> int:
    h = hashlib.blake2b(repr((bucket_bytes, [(n, str(d), s) for n, d, s in meta])).encode(),
                        digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 2


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def plan_buckets(meta: Meta, bucket_bytes: int) -> list[list[tuple[int, int]]]:
    """Consecutive tensors packed into buckets of at most ``bucket_bytes`` (a larger tensor
    alone): per bucket, (tensor index, byte offset) of each tensor. Both ends plan from
    the same lists, so they agree on every bucket's layout."""
    buckets: list[list[tuple[int, int]]] = []
    used = 0
    for i, (_, dtype, shape) in enumerate(meta):
        size = -(-_nbytes(dtype, shape) // ALIGN) * ALIGN
        if not buckets or (used > 0 and used + size > bucket_bytes):
            buckets.append([])
            used = 0
        buckets[-1].append((i, used))
        used += size
    return buckets


def _bucket_size(meta: Meta, bucket: list[tuple[int, int]]) -> int:
    i, offset = bucket[-1]
    return offset + _nbytes(meta[i][1], meta[i][2])


def _view(buffer: Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    return buffer[offset:offset + _nbytes(dtype, shape)].view(dtype).view(shape)


def _check_bucket_bytes(bucket_bytes: Any) -> int:
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    return bucket_bytes


def _named_tensors(weights: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]
                   ) -> list[tuple[str, Tensor]]:
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    return list(weights.items() if isinstance(weights, Mapping) else weights)


def send_weights(weights: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
                 group: SyncGroup, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """The trainer's end of ``update_weights_from_distributed``: broadcast ``weights`` (a
    model's state dict, a mapping or (name, tensor) pairs, HF names, full tensors) from
    this rank, in the order the engine was given ``metadata_of(weights)``.

    Returns once every engine rank accepted the update; raises on every rank if any
    rejected it (the engine then keeps its old weights).
    """
    error, meta = None, None
    try:
        items = _named_tensors(weights)
        for name, t in items:
            if not isinstance(t, Tensor):
                raise TypeError(f"weight {name!r}: expected a tensor, got {type(t).__name__}")
        meta = update_metadata(*metadata_of(items))
        _check_bucket_bytes(bucket_bytes)
    except (TypeError, ValueError) as e:
        error = e

    def fill(bucket: list[tuple[int, int]], views: list[tuple[str, Tensor]]) -> None:
        for (i, _), (_, view) in zip(bucket, views):
            view.copy_(items[i][1])

    if _transfer(group, meta, bucket_bytes, error, group.rank, fill=fill):
        raise ValueError("an engine rank rejected the update (its error names the weight); "
                         "the engine kept its old weights")


def _transfer(group: SyncGroup, meta: Any, bucket_bytes: int, error: Exception | None,
              src: int, fill: Callable[[list[tuple[int, int]], list[tuple[str, Tensor]]], None]
              | None = None, arrived: Callable[[list[tuple[str, Tensor]]], Exception | None]
              | None = None) -> bool:
    """The protocol both ends run: every rank agrees on (its error, the update's digest);
    if all are ready, each bucket is broadcast from ``src`` (``fill`` writes the sender's
    views, ``arrived`` takes the receiver's and returns an error to raise after the last
    bucket, so the ranks stay in step); then every rank agrees again. Raises this rank's
    error, or a peer's rejection or mismatch before anything was sent; returns whether a
    rank rejected the update at the end."""
    digest = _digest(meta, bucket_bytes) if error is None else 0
    rejected = False
    with group.transfer():
        failed, same = group.agree(error is not None, digest)
        if error is None and not failed and same:
            for bucket in plan_buckets(meta, bucket_bytes):
                buffer = torch.empty(_bucket_size(meta, bucket), dtype=torch.uint8,
                                     device=group.device)
                views = [(meta[i][0], _view(buffer, offset, *meta[i][1:]))
                         for i, offset in bucket]
                if fill is not None:
                    fill(bucket, views)
                group.broadcast(buffer, src)
                if arrived is not None:
                    late = arrived(views)
                    error = error or late
            rejected, _ = group.agree(error is not None, digest)
    if error is not None:
        raise error
    _raise_if_rejected(failed, same)
    return rejected


def _raise_if_rejected(failed: bool, same: bool) -> None:
    if failed:
        raise ValueError("another rank of the weight-sync group rejected this update (its "
                         "error names the cause); nothing was sent or written")
    if not same:
        raise ValueError("the ranks of the weight-sync group were given different names, "
                         "dtypes, shapes or bucket_bytes; nothing was sent or written")


def receive_weights(group: SyncGroup, names: Sequence[str], dtypes: Sequence[Any],
                    shapes: Sequence[Sequence[int]], src: int,
                    check: Callable[[list[tuple[str, Tensor]], bool], None], *,
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES, check_finite: bool = True
                    ) -> list[tuple[str, Tensor]]:
    """The engine's end: every tensor of the update, staged on ``group.device`` and checked
    by ``check(items, check_finite)`` (the names, dtypes and shapes up front, the values of
    each bucket as it arrives), once every rank agreed it is whole and valid; otherwise
    raises on every rank (module docstring)."""
    error, meta = None, None
    try:
        meta = update_metadata(names, dtypes, shapes)
        _check_bucket_bytes(bucket_bytes)
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < group.size \
                or src == group.rank:
            raise ValueError(f"src must be the trainer's rank in the weight-sync group "
                             f"[0, {group.size}), not this rank {group.rank}; got {src!r}")
        check([(name, torch.empty(shape, dtype=dtype, device="meta"))
               for name, dtype, shape in meta], False)
    except (TypeError, ValueError) as e:
        error = e
    staged: list[tuple[str, Tensor]] = []

    def arrived(views: list[tuple[str, Tensor]]) -> Exception | None:
        staged.extend(views)
        if check_finite:
            try:
                check(views, True)
            except (TypeError, ValueError) as e:
                return e
        return None

    if _transfer(group, meta, bucket_bytes, error, src, arrived=arrived):
        raise ValueError("another rank of the weight-sync group rejected this update; the "
                         "old weights were kept")
    return staged


def ipc_handles(weights: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]
                ) -> dict[str, Any]:
    """The trainer's end of ``update_weights_from_ipc``: HF name -> a picklable handle of
    the tensor's memory (CUDA IPC for CUDA tensors).

    Make fresh handles for each update: making them records an event on the current
    stream, after the trainer's writes so far, which the engine waits for before reading,
    and torch counts one release per handle made. Keep the tensors alive and unchanged,
    and this process running, until the engine's call returns: the engine has then
    finished reading them and holds no reference to them, so the trainer may change or
    free them, or exit. (An owner that frees or exits while another process still maps
    its CUDA memory is what torch warns of as "Producer process has been terminated
    before all shared CUDA tensors released".)"""
    from torch.multiprocessing.reductions import reduce_tensor
    return {name: reduce_tensor(t.detach()) for name, t in _named_tensors(weights)}


def open_ipc_handles(handles: Mapping[str, Any]) -> dict[str, Tensor]:
    """HF name -> tensor over the trainer's memory, for each of ``ipc_handles``' handles.
    Only torch's own rebuild functions are called."""
    if not isinstance(handles, Mapping):
        raise TypeError(f"handles must map HF names to ipc_handles() entries, got "
                        f"{type(handles).__name__}")
    out = {}
    for name, handle in handles.items():
        if not (isinstance(handle, tuple) and len(handle) == 2 and callable(handle[0])
                and getattr(handle[0], "__module__", "") == "torch.multiprocessing.reductions"
                and isinstance(handle[1], tuple)):
            raise TypeError(f"handle of weight {name!r} is not an ipc_handles() entry: "
                            f"{handle!r:.80}")
        out[name] = handle[0](*handle[1])
    return out
