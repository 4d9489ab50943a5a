"""Tensor parallelism on torch.distributed: the TP group the sharded layers read, its
collectives, the worker pool of single-process launches, and a data-parallel helper.

Two launches share one code path. Under torchrun (or any initialised process group) every
rank is an SPMD peer: it builds its own shard, runs its own scheduler on the same input
and so stays in lockstep with the others. From a plain process, ``WorkerPool`` spawns the
N peers itself and forwards calls to them. At tp_size 1 nothing here runs a collective.
"""
from __future__ import annotations

import hashlib
import os
import socket
import traceback
from array import array
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in its tensor-parallel group. ``group`` is the torch process
    group (None at size 1); collectives' tensors live on ``device`` (cuda for NCCL)."""
    rank: int = 0
    size: int = 1
    group: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def all_reduce(self, x: Tensor) -> Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: Tensor) -> Tensor:
        """x [...] from every rank -> [size, ...] in rank order."""
        out = x.new_empty((self.size, *x.shape))
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=self.group)
        return out

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def validated(self, check: Callable[[], T], fingerprint: Callable[[T], int] | None = None
                  ) -> T:
        """Run ``check`` (input validation) on every rank, then agree before any real
        collective: if it raised on any rank, or ranks were given different input (by
        ``fingerprint``), every rank raises instead of some waiting forever."""
        if self.size == 1:
            return check()
        error, value, digest = None, None, 0
        try:
            value = check()
            if fingerprint is not None:
                digest = fingerprint(value)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the agreement
            error = e
        # a signed 63-bit digest fits the int64 exchange
        state = torch.tensor([error is not None, digest], dtype=torch.int64, device=self.device)
        flags = self.all_gather(state).tolist()
        if error is not None:
            raise error
        failed = [r for r, (bad, _) in enumerate(flags) if bad]
        if failed:
            raise ValueError(f"tensor-parallel rank(s) {failed} rejected this call "
                             f"(their error names the cause); nothing ran")
        differ = [r for r, (_, d) in enumerate(flags) if d != flags[0][1]]
        if differ:
            raise ValueError(f"tensor-parallel ranks {differ} were given different input "
                             f"than rank 0; every rank must make the same call")
        return value


_GROUP = TPGroup()


def tp_group() -> TPGroup:
    """The group that layers being constructed now shard over."""
    return _GROUP


@contextmanager
def building_with(group: TPGroup) -> Iterator[None]:
    """Layers constructed inside shard over ``group`` (they keep it for their forward)."""
    global _GROUP
    previous, _GROUP = _GROUP, group
    try:
        yield
    finally:
        _GROUP = previous


def vocab_range(vocab: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's [start, end) of the vocabulary; the first vocab % size ranks hold one more."""
    base, extra = divmod(vocab, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's [first, end) KV heads: split when size divides them, else each head is
    replicated on size / num_kv_heads consecutive ranks (those holding its q heads)."""
    if size <= num_kv_heads:
        local = num_kv_heads // size
        return rank * local, (rank + 1) * local
    head = rank // (size // num_kv_heads)
    return head, head + 1


def check_shardable(config: Any, size: int) -> None:
    """ValueError naming the first model dimension that ``size`` ranks cannot split."""
    if size == 1:
        return
    heads, kv = config.num_heads, config.num_kv_heads
    if heads % size:
        raise ValueError(f"tp_size {size} does not divide num_attention_heads {heads}")
    if (kv % size) if size <= kv else (size % kv):
        raise ValueError(f"tp_size {size} and num_key_value_heads {kv}: one must divide "
                         f"the other (KV heads are split, or replicated when tp_size > {kv})")
    if config.intermediate_size % size:
        raise ValueError(f"tp_size {size} does not divide intermediate_size "
                         f"{config.intermediate_size}")
    if config.vocab_size < size:
        raise ValueError(f"tp_size {size} exceeds the vocabulary of {config.vocab_size}")


def launched_spmd() -> bool:
    """True when this process is one rank of a job (process group up, or torchrun env)."""
    return dist.is_available() and (dist.is_initialized() or "WORLD_SIZE" in os.environ)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))


_SUBGROUPS: dict[int, Any] = {}


def init_tp_group(size: int, device: torch.device) -> TPGroup:
    """The TP group of this rank: consecutive blocks of ``size`` ranks of the world (so
    world = dp x tp). Initialises the default group from torchrun's env when needed:
    NCCL for CUDA devices, gloo for the CPU."""
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # device_id binds the NCCL communicator to this rank's GPU (barriers need it)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"tp_size {size} does not divide the world size {world}")
    if world == size:
        group = dist.group.WORLD
    else:
        if size not in _SUBGROUPS:
            # every rank must create every subgroup, in the same order
            blocks = [dist.new_group(list(range(s, s + size))) for s in range(0, world, size)]
            _SUBGROUPS[size] = blocks[rank // size]
        group = _SUBGROUPS[size]
    return TPGroup(rank=rank % size, size=size, group=group, device=device)


def sequences_fingerprint(seqs: Sequence[tuple[list[int], list[int]]], *extra: object) -> int:
    """A 63-bit digest of validated sequences and call options, to compare across ranks."""
    h = hashlib.blake2b(repr(extra).encode(), digest_size=8)
    for prompt, completion in seqs:
        h.update(array("q", (len(prompt), len(completion))).tobytes())
        h.update(array("q", prompt).tobytes())
        h.update(array("q", completion).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def compute_log_probs_dp(engine: Any, sequences: Sequence[Any], temperature: float = 1.0, *,
                         return_entropy: bool = False) -> dict[str, list]:
    """Data parallelism under torchrun: one engine per TP group (world = dp x tp).

    Every rank passes the same full ``sequences``; DP rank k (= rank // tp_size) scores
    the k-th contiguous slice, and every rank returns the whole result, in input order,
    as lists. A call rejected on any rank raises on every rank.
    """
    if not dist.is_initialized():
        raise RuntimeError("compute_log_probs_dp needs an initialised process group "
                           "(launch with torchrun)")
    world, rank, tp = dist.get_world_size(), dist.get_rank(), engine.config.tp_size
    dp_size, dp_rank = world // tp, rank // tp
    n = len(sequences)
    lo, hi = n * dp_rank // dp_size, n * (dp_rank + 1) // dp_size
    try:
        reply: tuple[str, Any] = ("ok", engine.compute_log_probs(
            list(sequences[lo:hi]), temperature, return_entropy=return_entropy))
    except Exception as e:  # noqa: BLE001 - every rank must reach the gather below
        reply = ("err", e)
    replies: list[Any] = [None] * world
    dist.all_gather_object(replies, (reply[0], reply[1] if reply[0] == "ok" else repr(reply[1])))
    if reply[0] == "err":
        raise reply[1]
    failed = [r for r, (status, _) in enumerate(replies) if status == "err"]
    if failed:
        raise ValueError(f"ranks {failed} rejected their slice: {replies[failed[0]][1]}")
    firsts = [replies[k * tp][1] for k in range(dp_size)]
    return {key: [row for part in firsts for row in part[key]] for key in firsts[0]}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, size: int, port: int, engine_kwargs: dict[str, Any], conn) -> None:
    """One spawned TP rank: join the group, build the engine shard, serve calls."""
    from .engine import Engine

    device = engine_kwargs["device"]
    if device.type == "cpu":
        # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    else:
        torch.cuda.set_device(device)
    engine = None
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=size, timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
        engine = Engine(**engine_kwargs)
        conn.send(("ok", None))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        _send_error(conn, e)
    while engine is not None:
        try:
            method, args, kwargs = conn.recv()
        except EOFError:  # the caller went away without closing
            break
        try:
            conn.send(("ok", getattr(engine, method)(*args, **kwargs)))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            _send_error(conn, e)
        if method == "close":
            # every rank closes: tearing down while a peer is still in the group aborts it
            dist.barrier()
            break
    if dist.is_initialized():
        dist.destroy_process_group()
    conn.close()


def _send_error(conn, error: Exception) -> None:
    try:
        conn.send(("err", error))
    except Exception:  # noqa: BLE001 - an unpicklable error still has to arrive
        conn.send(("err", RuntimeError("".join(traceback.format_exception(error)))))


class WorkerPool:
    """N spawned processes, one TP rank each, that the caller's Engine forwards to.

    Every call goes to every worker; all must answer, and rank 0's answer (identical on
    every rank) is returned, or the first error raised.
    """

    def __init__(self, size: int, engine_kwargs: dict[str, Any]):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = _free_port()
        device = engine_kwargs["device"]
        self.conns, self.procs = [], []
        for rank in range(size):
            kwargs = dict(engine_kwargs)
            if device.type == "cuda":
                kwargs["device"] = torch.device("cuda", rank)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(rank, size, port, kwargs, child),
                               daemon=True, name=f"tokenspeed-tp{rank}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        try:
            self._gather()
        except BaseException:
            self.shutdown()
            raise

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        for conn in self.conns:
            conn.send((method, args, kwargs))
        return self._gather()

    def _recv(self, rank: int) -> tuple[str, Any]:
        conn, proc = self.conns[rank], self.procs[rank]
        while not conn.poll(0.5):
            if not proc.is_alive():
                raise RuntimeError(f"tensor-parallel worker {rank} exited "
                                   f"(exit code {proc.exitcode})")
        return conn.recv()

    def _gather(self) -> Any:
        replies = [self._recv(rank) for rank in range(len(self.conns))]
        for status, value in replies:
            if status == "err":
                raise value
        return replies[0][1]

    def shutdown(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                try:
                    conn.send(("close", (), {}))
                except (BrokenPipeError, OSError):
                    pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self.conns:
            conn.close()
