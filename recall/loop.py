"""The one training loop: epochs, validation, early stopping, time budget, progress and DDP hooks.

Both towers and the ranker train through :func:`train_loop`, each supplying a
:class:`Task`: the example order of an epoch, the loss of a batch and its validation.
The loop owns everything else, so budgets, early stopping and distributed training
behave the same for every model.
"""

import copy
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from funnel.recall import distributed
from funnel.recall.allocator import steady_steps
from funnel.recall.exchange import TRANSPORT_ENV, TRANSPORTS, SharedMemoryExchange, shared_memory_usable
from funnel.recall.lazy_adam import LazyAdam

log = logging.getLogger("funnel.train")

BUDGET_CHECK_STEPS = 16
"""Under DDP, steps between budget checks (each one waits for every rank)."""


@dataclass(frozen=True)
class LoopConfig:
    """What the loop needs to know of a model's training settings.

    Attributes:
        name: the model's name in progress bars and log lines (``two-tower``, ``ranker``).
        unit: what an example is called in log lines (``samples``, ``groups``).
        score_name: the early-stopping score's name in log lines.
        epochs, patience, batch_size: as in the train configs.
        grad_clip: joint gradient norm limit (0: no clipping).
    """

    name: str
    unit: str
    score_name: str
    epochs: int
    patience: int
    batch_size: int
    grad_clip: float = 0.0


@dataclass
class Validation:
    """One epoch's validation: ``metrics`` for the history, ``brief`` for the log line, ``score`` for early stopping (None: minus the mean loss)."""

    metrics: dict
    brief: dict
    score: float | None


class Task(Protocol):
    """What a model supplies to :func:`train_loop`.

    A task may also have ``prefetch(idx)``: build the inputs of the batch ``idx`` ahead,
    for its next ``loss(idx)``. The loop calls it with the next batch while the ranks
    exchange gradients (:meth:`SparseTableOptimizer.reduce_gradients`).
    """

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """Example indices of the next epoch, in order (the same on every rank; the loop shards them)."""

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        """The scalar loss of the examples ``idx``, through the (possibly DDP-wrapped) model."""

    def validate(self) -> Validation:
        """Validation of the model as it stands (eval mode)."""


class Prefetched:
    """The inputs of one batch, built ahead of its loss by a task's ``prefetch`` (see :class:`Task`).

    They serve the next loss only, and only if it is for that same batch (the same index
    array); any other loss builds its own.

    Attributes:
        held: ``(idx, inputs)`` waiting for the next loss, or None.
    """

    def __init__(self):
        self.held: tuple | None = None

    def put(self, idx: np.ndarray, inputs) -> None:
        self.held = (idx, inputs)

    def take(self, idx: np.ndarray, build: Callable[[np.ndarray], object]):
        """The held inputs when they are ``idx``'s, else ``build(idx)``; nothing stays held."""
        held, self.held = self.held, None
        return held[1] if held is not None and held[0] is idx else build(idx)


class EarlyStopping:
    """Keeps the best weights by a validation score and says when to stop.

    Args:
        patience: epochs without improvement before stopping.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best = float("-inf")
        self.best_epoch = 0
        self.state: dict | None = None
        self.bad_epochs = 0

    def step(self, score: float, model: torch.nn.Module, epoch: int = 0) -> bool:
        """Record epoch ``epoch``'s score; returns True when training should stop."""
        if score > self.best:
            self.best, self.best_epoch, self.state, self.bad_epochs = score, epoch, copy.deepcopy(model.state_dict()), 0
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the best weights back into ``model`` (eval mode)."""
        model.load_state_dict(self.state)
        return model.eval()


class SparseTableOptimizer:
    """AdamW over a model, with given embedding tables on sparse gradients and a lazy Adam.

    A dense Adam step rewrites every row of a table, however few a batch touched; at
    hundreds of thousands of items that is most of a CPU training step. The tables get
    sparse gradients and a lazy Adam (:class:`recall.lazy_adam.LazyAdam`: moments of
    untouched rows wait until a batch touches them; no weight decay on them), the rest AdamW.

    Under DDP the tables' gradients are averaged by :meth:`reduce_gradients`, not by DDP
    (wrap the model with ``distributed.wrap(..., ignore=opt.sparse_parameters, comm_hook=opt.comm_hook)``).
    When every rank runs on one host, :meth:`reduce_gradients` averages the dense
    gradients too, in the same exchange through shared memory (:mod:`recall.exchange`),
    one step late: each step applies the previous step's mean, and
    :meth:`flush_gradients` brings the last one after an epoch's steps. Otherwise DDP
    all-reduces the dense gradients and the tables' rows travel by gloo, in step.

    Args:
        model: the module being trained.
        tables: its embedding tables to make sparse (none: plain AdamW).
        lr, weight_decay: as for AdamW.
        world: the distributed setting.
        exchange: what the tables' gradients travel as between ranks (see
            :func:`recall.distributed.average_sparse_gradient`); ``"auto"``: float32
            through shared memory, bfloat16 over gloo.
        transport: how gradients travel between ranks: ``"auto"`` (shared memory when every
            rank is on this host and ``/dev/shm`` has room, else gloo), ``"shared"`` or
            ``"gloo"``; None: the ``FUNNEL_GRAD_TRANSPORT`` environment variable, else
            ``"auto"``. Every rank must construct the optimiser at the same point:
            choosing is a collective.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tables: list[torch.nn.Embedding],
        lr: float,
        weight_decay: float,
        world: distributed.World = distributed.World(),
        exchange: str = "float32",
        transport: str | None = None,
    ):
        transport = transport or os.environ.get(TRANSPORT_ENV) or "auto"
        if exchange != "auto" and exchange not in distributed.EXCHANGE_DTYPES:
            raise ValueError(f"exchange must be 'auto' or one of {sorted(distributed.EXCHANGE_DTYPES)}, not {exchange!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport (or {TRANSPORT_ENV}) must be one of {TRANSPORTS}, not {transport!r}")
        self.tables = tables
        self.world = world
        self.exchange = exchange
        sparse = {id(t.weight) for t in tables}
        for table in tables:
            table.sparse = True
        self.params = list(model.parameters())
        self.dense = [p for p in self.params if id(p) not in sparse]
        self.optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(self.dense, lr=lr, weight_decay=weight_decay)
        ]
        self.lazy = LazyAdam([t.weight for t in tables], lr=lr) if tables else None
        if self.lazy is not None:
            self.optimizers.append(self.lazy)
        shared = bool(tables) and world.distributed and transport != "gloo" and (transport == "shared" or shared_memory_usable(world))
        if exchange == "auto":
            self.exchange = "float32" if shared else "bfloat16"
        self.shared = SharedMemoryExchange(world, self.exchange) if shared else None
        if world.distributed and world.main and tables:
            how = "one shared-memory exchange a step, a step late" if shared else "DDP all-reduce and a gloo all-gather"
            log.info("gradients averaged across %d processes by %s (table rows as %s)", world.size, how, self.exchange)

    @property
    def comm_hook(self):
        """The DDP communication hook :meth:`reduce_gradients` relies on (None: DDP's own all-reduce)."""
        return self.shared.defer if self.shared is not None else None

    @property
    def sparse_parameters(self) -> list[torch.Tensor]:
        """The tables' weights, whose gradients :meth:`reduce_gradients` averages across ranks (not DDP)."""
        return [t.weight for t in self.tables]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def reduce_gradients(self, while_waiting: Callable[[], None] | None = None) -> None:
        """After the backward pass: sum each table gradient's repeated rows, and under DDP average it across ranks
        (with the dense gradients, when they travel through shared memory: then the
        gradients left are the previous step's means, or None at an epoch's first step).

        Args:
            while_waiting: work that needs no gradient (the next batch's inputs), done while
                this rank waits for the others' messages (shared-memory exchange only).
        """
        for p in self.sparse_parameters:
            if p.grad is not None:
                self.lazy.coalesce_grad(p)  # one value per row travels
        if self.shared is not None:
            self.shared.exchange(self.dense, self.sparse_parameters, while_waiting)
        elif self.world.distributed:
            for p in self.sparse_parameters:
                if p.grad is not None:
                    p.grad = distributed.average_sparse_gradient(p.grad, self.world, self.exchange)

    def flush_gradients(self) -> bool:
        """After an epoch's last step: the mean of that step's gradients, which the shared-memory exchange holds back a step.

        Returns:
            Whether gradients are waiting to be applied (clip and :meth:`step` them).
        """
        return self.shared is not None and self.shared.flush(self.sparse_parameters)

    def clip_grad_norm(self, max_norm: float) -> None:
        """Scale every gradient, sparse ones included, so their joint L2 norm is at most ``max_norm``."""
        grads = []
        for p in self.params:
            if p.grad is not None and p.grad.is_sparse:
                self.lazy.coalesce_grad(p)  # repeated rows summed, so the norm counts each row once
                grads.append(p.grad._values())
            elif p.grad is not None:
                grads.append(p.grad)
        total = torch.sqrt(sum(g.pow(2).sum() for g in grads)) if grads else torch.tensor(0.0)
        scale = max_norm / (total + 1e-6)
        if scale < 1:
            for g in grads:
                g.mul_(scale)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def finish(self) -> None:
        """Dense gradients again, for whoever trains the model next; the shared-memory exchange closed."""
        for table in self.tables:
            table.sparse = False
        if self.shared is not None:
            self.shared.close()


class EpochClock:
    """A training loop's time budget, cut into epochs that each end in time for validation.

    The budget counts from the clock's creation, so a loop that creates it before its
    preparation (sampling, candidate groups, validation sets) spends its budget on that
    too; the epochs share what is left when the first one starts (at least a quarter of
    the budget, so an overrun preparation still leaves a trained model).

    Args:
        max_seconds: the loop's budget (0: no limit, and epochs run to their end).
        epochs: the number of epochs the budget is cut into at least.
    """

    def __init__(self, max_seconds: float, epochs: int):
        self.max_seconds = max_seconds
        self.epochs = max(epochs, 1)
        self.slice = 0.0
        self.started = self.epoch_started = time.perf_counter()
        self.deadline = self.started + max_seconds

    def start_epoch(self) -> None:
        self.epoch_started = time.perf_counter()
        if self.max_seconds and not self.slice:
            self.deadline = max(self.deadline, self.epoch_started + self.max_seconds / 4)
            self.slice = (self.deadline - self.epoch_started) / self.epochs

    def epoch_over(self) -> bool:
        """Whether the running epoch has used its slice of the budget, or the budget is spent."""
        now = time.perf_counter()
        return bool(self.max_seconds) and (now - self.epoch_started >= self.slice or now >= self.deadline)

    def spent(self) -> bool:
        """Whether the budget is used up (no new epoch should start)."""
        return bool(self.max_seconds) and time.perf_counter() >= self.deadline

    def epoch_seconds(self) -> float:
        return time.perf_counter() - self.epoch_started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> str:
        """``", budget 12.0 min left"`` under a budget, else ``""`` (for progress lines)."""
        return f", budget {max(self.deadline - time.perf_counter(), 0) / 60:.1f} min left" if self.max_seconds else ""


def epoch_record(epoch: int, loss: float, samples: int, seconds: float, valid: dict) -> dict:
    """One epoch's entry in a training history: mean loss, samples seen and their rate (per second of training, validation excluded), validation metrics."""
    return {"epoch": epoch, "loss": round(loss, 5), "samples": samples, "samples_per_s": round(samples / max(seconds, 1e-9), 1), "valid": valid}


def close_history(history: dict, stopper: EarlyStopping, clock: "EpochClock") -> None:
    """Add a finished loop's totals to its history: the kept epoch and its score, samples seen, seconds."""
    history["kept_epoch"] = stopper.best_epoch
    history["samples"] = int(sum(e["samples"] for e in history["epochs"]))
    history["seconds"] = round(clock.elapsed(), 1)
    history["best_valid_ndcg@10"] = stopper.best


def brief_metrics(metrics: dict) -> str:
    """Validation metrics for a log line: ``ndcg@10 0.1234, hr@10 0.2345``."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)) or "none"


def pick_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _apply(opt: SparseTableOptimizer, cfg: LoopConfig) -> None:
    """Clip (when configured) and apply the gradients the parameters hold."""
    if cfg.grad_clip:
        opt.clip_grad_norm(cfg.grad_clip)
    opt.step()


@steady_steps()  # a step's freed buffers serve the next step (recall.allocator)
def train_loop(
    model: torch.nn.Module,
    task: Task,
    opt: SparseTableOptimizer,
    cfg: LoopConfig,
    *,
    clock: EpochClock,
    world: distributed.World,
    rng: np.random.Generator,
    history: dict,
    progress: bool = True,
) -> torch.nn.Module:
    """Train ``model`` epoch by epoch until early stopping, the epoch count or the budget ends it.

    Args:
        model: the module whose weights early stopping keeps.
        task: the model's examples, loss and validation.
        opt: the optimiser over ``model``.
        cfg: epochs, patience, batch size, clipping and the names for log lines.
        clock: the time budget (created before the task's preparation, which it counts).
        world: the distributed setting; every rank runs the loop on its shard of each epoch.
        rng: draws the epoch orders (seeded alike on every rank).
        history: receives one record per epoch, then the totals (:func:`close_history`).
        progress: show progress bars.

    Returns:
        ``model`` with the best epoch's weights, in eval mode.
    """
    stopper = EarlyStopping(cfg.patience)
    # Each budget check is a collective across ranks, a barrier no step can run past; an epoch
    # without a budget needs none, and under DDP a check every few steps overruns by moments.
    check_every = BUDGET_CHECK_STEPS if world.distributed else 1
    for epoch in range(cfg.epochs):
        if epoch and distributed.any_rank(clock.spent(), world):  # the first epoch always runs: early stopping needs one validated model
            break
        model.train()
        order = distributed.shard(task.epoch_order(rng), world)
        total, steps, seen = 0.0, 0, 0
        clock.start_epoch()
        prefetch = getattr(task, "prefetch", None)
        nxt = order[: cfg.batch_size]
        for lo in tqdm(range(0, len(order), cfg.batch_size), desc=f"{cfg.name} epoch {epoch + 1}", disable=not progress, leave=False):
            idx, nxt = nxt, order[lo + cfg.batch_size : lo + 2 * cfg.batch_size]
            loss = task.loss(idx)
            opt.zero_grad()
            loss.backward()
            opt.reduce_gradients(while_waiting=functools.partial(prefetch, nxt) if prefetch is not None and len(nxt) else None)
            _apply(opt, cfg)
            total += loss.item()
            steps += 1
            seen += len(idx) * world.size
            if clock.max_seconds and steps % check_every == 0 and distributed.any_rank(clock.epoch_over(), world):
                break
        if opt.flush_gradients():  # the epoch's last step, held back by the exchange, lands before validation
            _apply(opt, cfg)
        train_seconds = clock.epoch_seconds()
        model.eval()
        valid = task.validate()
        score = distributed.from_main(valid.score if valid.score is not None else -total / steps, world)  # one early-stopping decision for all ranks
        record = epoch_record(epoch + 1, total / steps, seen, train_seconds, valid.metrics)
        history["epochs"].append(record)
        log.info(
            "%s epoch %d: loss %.4f, %s %s at %s/s%s; valid %s",
            cfg.name, epoch + 1, total / steps, f"{seen:,}", cfg.unit, f"{record['samples_per_s']:,.0f}", clock.left(), brief_metrics(valid.brief),
        )  # fmt: skip
        if stopper.step(score, model, epoch + 1):
            break
    log.info("%s: kept epoch %d of %d (valid %s %.4f)", cfg.name, stopper.best_epoch, len(history["epochs"]), cfg.score_name, stopper.best)
    close_history(history, stopper, clock)
    opt.finish()
    return stopper.restore(model)
