"""Tensor parallelism from a plain process: spawned workers, one rank each.

``WorkerPool`` starts N processes that join one process group and each build a backend
(the engine's local shard) from a picklable factory, then forwards method calls to all
of them. It never imports the engine: the factory arrives by reference.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..interrupts import deferred_interrupts
from .launch import free_port


def _worker_main(rank: int, size: int, port: int, factory: Callable[[Any], Any], config: Any,
                 conn) -> None:
    """One spawned TP rank: join the group, build its backend, serve calls.

    Requests arrive as (tag, method, args, kwargs) and each reply carries its request's
    tag, so the parent can tell a late reply to an interrupted call from the current one.
    Ctrl-C reaches the whole process group; the parent decides what it means, so the
    workers ignore it and finish the call they are in.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device = config.device
    if device.type == "cpu":
        # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    else:
        torch.cuda.set_device(device)
    backend = None
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=size, timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
        backend = factory(config)
        conn.send((0, "ok", None))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        _send_error(conn, 0, e)
    while backend is not None:
        try:
            tag, method, args, kwargs = conn.recv()
        except EOFError:  # the caller went away without closing
            break
        try:
            value = getattr(backend, method)(*args, **kwargs)
            # every rank's answer is the same and the caller takes rank 0's: only it travels
            # (device tensors would open every rank's GPU in the caller)
            conn.send((tag, "ok", value if rank == 0 else None))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            _send_error(conn, tag, e)
        if method == "close":
            # every rank closes: tearing down while a peer is still in the group aborts it
            dist.barrier()
            break
    if dist.is_initialized():
        dist.destroy_process_group()
    conn.close()


def _send_error(conn, tag: int, error: Exception) -> None:
    try:
        conn.send((tag, "err", error))
    except Exception:  # noqa: BLE001 - an unpicklable error still has to arrive
        conn.send((tag, "err", RuntimeError("".join(traceback.format_exception(error)))))


class WorkerPool:
    """N spawned processes, one TP rank each, each holding ``factory(config)`` (with
    ``config.device`` moved to GPU r for rank r on CUDA); the caller forwards to them.

    Every call goes to every worker; all must answer, and rank 0's answer (identical on
    every rank) is returned, or the first error raised. Calls are numbered: a call
    interrupted while it waits (Ctrl-C) leaves its replies in the pipes, and the next
    call skips them instead of returning them as its own. Writing and reading one
    message is never interrupted half-way, so the pipes stay framed.
    """

    def __init__(self, size: int, factory: Callable[[Any], Any], config: Any):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = free_port()
        self.conns, self.procs = [], []
        self._tag = 0  # the tag of the latest call; 0 is the start-up reply
        for rank in range(size):
            rank_config = config
            if config.device.type == "cuda":
                rank_config = dataclasses.replace(config, device=torch.device("cuda", rank))
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main,
                               args=(rank, size, port, factory, rank_config, child),
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
        with deferred_interrupts():
            # all workers get the request or none does: a worker left out would leave the
            # others waiting in their first collective
            self._tag += 1
            for conn in self.conns:
                conn.send((self._tag, method, args, kwargs))
        return self._gather()

    def _recv(self, rank: int) -> tuple[str, Any]:
        """The reply of worker ``rank`` to the latest call, skipping older ones."""
        conn, proc = self.conns[rank], self.procs[rank]
        while True:
            while not conn.poll(0.5):
                if not proc.is_alive():
                    raise RuntimeError(f"tensor-parallel worker {rank} exited "
                                       f"(exit code {proc.exitcode})")
            with deferred_interrupts():
                tag, status, value = conn.recv()
            if tag == self._tag:
                return status, value

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
                    conn.send((-1, "close", (), {}))
                except (BrokenPipeError, OSError):
                    pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self.conns:
            conn.close()
