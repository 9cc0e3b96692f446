"""Data-parallel training on ``torch.distributed``, in the processes ``torchrun`` starts.

Every process reads the log and builds the same arrays; each trains on its own equal
share of every epoch's examples, and the gradients are averaged (DistributedDataParallel
for the dense parameters, :func:`average_sparse_gradient` for sparse id tables), so N
processes see N times the samples in the same time. Decisions that end a loop
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


def wrap(module: torch.nn.Module, world: World, ignore: list[torch.Tensor] | None = None) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when training is distributed, else itself.

    Args:
        module: the module whose forward computes the loss.
        world: the distributed setting.
        ignore: parameters whose gradients DDP must leave alone, because they are averaged
            another way (:func:`average_sparse_gradient`). They are copied from rank 0 here,
            as DDP copies the others.
    """
    if not world.distributed:
        return module
    if ignore:
        skip = {id(p) for p in ignore}
        # Every name of an ignored parameter (a table two towers share has two). This is
        # DDP's own way, private but what TorchRec uses too, of leaving parameters to another scheme.
        names = [name for name, p in module.named_parameters(remove_duplicate=False) if id(p) in skip]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
        with torch.no_grad():
            for p in ignore:
                dist.broadcast(p.data, src=0)
    # Buffers are synced once at the start, not before every step: none change in training.
    return DistributedDataParallel(module, forward_sync_buffers=False)


def average_sparse_gradient(grad: torch.Tensor, world: World) -> torch.Tensor:
    """The mean over ranks of a sparse [rows, d] gradient, as DDP would average it, but cheaper.

    DDP's sparse all-reduce on gloo took 17 ms for the 14k rows of a two-tower batch
    (870k-item table) on two CPU processes. Here each rank's distinct rows travel as two
    dense all-gathers (about 5 ms), and the sum of rows several ranks touched is left to
    the caller's coalesce, which its optimiser does anyway.

    Args:
        grad: this rank's sparse gradient, coalesced (:meth:`recall.lazy_adam.LazyAdam.coalesce_grad`:
            one value per row travels; an uncoalesced one is coalesced here, more slowly).
        world: the distributed setting.

    Returns:
        A sparse gradient of the same shape whose coalesced value is the mean of every
        rank's (uncoalesced: a row can appear once per rank).
    """
    if not world.distributed:
        return grad
    own = grad.coalesce()  # a no-op for a coalesced gradient
    rows, values = own.indices()[0], own.values()  # [n], [n, d]
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world.size)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
    sizes = [int(c) for c in counts]
    most = max(sizes)
    # Collectives move equal shapes: every rank pads its rows to the largest count.
    padded_rows = rows.new_zeros(most)
    padded_rows[: len(rows)] = rows
    padded_values = values.new_zeros(most, values.shape[1])
    padded_values[: len(rows)] = values
    all_rows = [torch.empty_like(padded_rows) for _ in range(world.size)]
    all_values = [torch.empty_like(padded_values) for _ in range(world.size)]
    dist.all_gather(all_rows, padded_rows)
    dist.all_gather(all_values, padded_values)
    rows = torch.cat([r[:n] for r, n in zip(all_rows, sizes)])  # [sum n]
    values = torch.cat([v[:n] for v, n in zip(all_values, sizes)]).div_(world.size)  # [sum n, d]
    return torch.sparse_coo_tensor(rows[None], values, grad.shape, check_invariants=False)


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
