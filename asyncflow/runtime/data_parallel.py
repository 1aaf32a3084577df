"""Data-parallel trainer ranks: one torch.distributed process group per worker process.

The replicas of a data-parallel trainer live in different Dask worker processes (the
placement gives each rank a process of its own). Each one joins the *default*
torch.distributed group here, on its replica thread (`OperatorHost.join_data_parallel`);
`AccumulatingTrainer.end_step` then all-reduces the step's gradients and counters
across the group, so every rank takes the same optimizer step.

Why the default group: the trainer's collectives need no handle passed around, and a
process holds one rank of one trainer. The flip side is that a process can be a rank
of only one data-parallel trainer at a time (two replicated trainers must not share
worker processes); a single-replica trainer sharing the process never all-reduces
(it looks at its `OperatorContext.num_replicas`, not at the group).

Nothing here knows about Dask: the executor picks the rendezvous address on the
client (`free_address`) and calls `join` on every rank at once.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["default_backend", "free_address", "join", "leave", "rank", "world_size"]


def default_backend() -> str:
    """gloo on a CPU-only machine. With CUDA, gloo for CPU tensors and NCCL for CUDA
    tensors: the collective goes to the backend of the tensor's device, so a trainer
    whose model stays on the CPU still works on a GPU machine."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def join(
    address: str,
    rank: int,
    world_size: int,
    timeout_s: float = 60.0,
    backend: str | None = None,
) -> None:
    """Become rank `rank` of a fresh default process group of `world_size` ranks.

    `address` is the rendezvous (`tcp://HOST:PORT`, see `free_address`): rank 0 serves
    a key-value store there, the others connect to it; the call returns once all
    `world_size` ranks have joined, so the caller must start every rank's `join` at
    once (a lone rank blocks). `timeout_s` bounds that rendezvous and also each later
    collective (gloo's operation timeout): a rank whose peer hangs raises after it
    instead of blocking forever.

    A group already in this process (a recovery: a peer died and the ranks regroup
    with a replacement) is destroyed first, since a process has a single default group
    and a group that lost a rank cannot be used again.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad data-parallel rank {rank} of world size {world_size}")
    leave()
    dist.init_process_group(
        backend or default_backend(),
        init_method=address,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def leave() -> None:
    """Destroy this process's default group, if any (a no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Ranks in this process's group; 1 when the process is in none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in its group; 0 when the process is in none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def free_address(host: str = "127.0.0.1") -> str:
    """A `tcp://host:port` rendezvous address on a port that is free right now.

    The executor calls this on the client and hands the address to every rank; rank 0
    binds it moments later. Asking the OS for port 0 avoids collisions between runs and
    between regroupings of one run (each regrouping gets a new address, so a store left
    by the old group never answers the new one). The port could in principle be taken
    in between; the join would then fail, not hang. `host` must be an address rank 0's
    process can bind and every rank can reach: the loopback default suits a
    single-machine cluster.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    return f"tcp://{host}:{port}"
