"""Starting tensor parallelism: whether this process is one rank of a launched job
(torchrun or an initialised process group), and its TP group within the world."""
from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from .group import TPGroup


def launched_spmd() -> bool:
    """True when this process is one rank of a job (process group up, or torchrun env)."""
    return dist.is_available() and (dist.is_initialized() or "WORLD_SIZE" in os.environ)


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


def free_port() -> int:
    """A free TCP port on localhost, for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
