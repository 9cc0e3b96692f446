"""Data-parallel training on ``torch.distributed``, in the processes ``torchrun`` starts.

Every process reads the log and builds the same arrays; each trains on its own equal
share of every epoch's examples, and DistributedDataParallel averages the gradients, so
N processes see N times the samples in the same time. Decisions that end a loop
(budget, early stopping) are taken once for all ranks, so no rank waits for a
collective the others skipped. Outside ``torchrun`` this is a world of one and every
helper is a no-op.
"""

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

INIT_TIMEOUT = datetime.timedelta(minutes=30)
"""How long a collective waits for the other ranks (reading a 100M-event log alone takes minutes)."""


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: this process's index (0 writes the bundle and logs).
        size: the number of processes.
    """

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_from_env() -> World:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, NCCL with CUDA).

    Returns:
        This process's world; a world of one when ``WORLD_SIZE`` is unset or 1.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=INIT_TIMEOUT)
    return current()


def current() -> World:
    """The world of the process group already joined, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sparse_gradients_supported() -> bool:
    """Whether sparse embedding gradients can be averaged across ranks (gloo can, NCCL cannot)."""
    return not current().distributed or dist.get_backend() == "gloo"


def shard(order: np.ndarray, world: World) -> np.ndarray:
    """This rank's share of an epoch's example order (the same order on every rank).

    Every rank gets the same number of examples (the remainder is dropped), so all ranks
    take the same number of steps.
    """
    if not world.distributed:
        return order
    return order[world.rank :: world.size][: len(order) // world.size]


def wrap(module: torch.nn.Module, world: World) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when training is distributed, else itself."""
    if not world.distributed:
        return module
    # Buffers are synced once at the start, not before every step: none change in training.
    return DistributedDataParallel(module, forward_sync_buffers=False)


def any_rank(flag: bool, world: World) -> bool:
    """Whether ``flag`` holds on any rank; every rank gets the same answer."""
    if not world.distributed:
        return flag
    value = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_main(value: float, world: World) -> float:
    """Rank 0's ``value`` on every rank."""
    if not world.distributed:
        return value
    out = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.broadcast(out, src=0)
    return float(out.item())


def _device() -> torch.device:
    """Where collectives' tensors must live: NCCL works on CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
