"""Train the two-tower model next-item style on every training position."""

import copy
import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from funnel.events.dataset import Dataset
from funnel.events.metrics import summarize, target_ranks
from funnel.events.split import Split, subsample
from funnel.recall import distributed
from funnel.recall.model import TwoTower, TwoTowerConfig, sampled_softmax_loss, user_tensors
from funnel.recall.scoring import exact_topk
from funnel.recall.warm import freeze_rows, grown

log = logging.getLogger("funnel.train")


@dataclass
class TwoTowerTrainConfig:
    """Optimisation settings (saved beside the model config in the bundle manifest).

    Attributes:
        samples_per_epoch: training positions drawn (without replacement) per epoch;
            0 takes every position. On a 100M-event log an epoch over every position
            takes days on a CPU; sampled epochs keep validation and early stopping frequent.
        max_seconds: wall-clock budget of training, its preparation included (0: none).
            No epoch starts once it is spent, and each epoch ends after its share of what
            the preparation left (:class:`EpochClock`), so validation runs several times
            within the budget.
        budget_epochs: how many validated epochs a budget is cut into at least.
        max_valid_users, valid_scores: validation scores at most this many users, and
            fewer where users × items would pass ``valid_scores`` (exact search over the
            catalogue: 1,000 users at 4M items, about a minute on two cores, where 5,000
            took three per epoch).
        sparse_ids: the item id table trains with sparse gradients and a lazy Adam
            (:class:`SparseTableOptimizer`): at 870k items a step is 7x faster (154 ms
            against 1,079 ms for a batch of 512 on one thread). ``weight_decay`` then
            applies to the other parameters only.
    """

    epochs: int = 40
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
    uniform_negatives: int = 2048
    patience: int = 3
    seed: int = 0
    max_valid_users: int = 5000
    valid_scores: int = 4_000_000_000
    device: str = "auto"
    samples_per_epoch: int = 0
    max_seconds: float = 0.0
    budget_epochs: int = 8
    sparse_ids: bool = True


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
    sparse gradients and :class:`torch.optim.SparseAdam` (moments of untouched rows wait
    until a batch touches them; no weight decay on them), the rest AdamW.

    Args:
        model: the module being trained.
        tables: its embedding tables to make sparse (none: plain AdamW).
        lr, weight_decay: as for AdamW.
    """

    def __init__(self, model: torch.nn.Module, tables: list[torch.nn.Embedding], lr: float, weight_decay: float):
        self.tables = tables
        sparse = {id(t.weight) for t in tables}
        for table in tables:
            table.sparse = True
        self.params = list(model.parameters())
        self.optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW([p for p in self.params if id(p) not in sparse], lr=lr, weight_decay=weight_decay)
        ]
        if tables:
            self.optimizers.append(torch.optim.SparseAdam([t.weight for t in tables], lr=lr))

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> None:
        """Scale every gradient, sparse ones included, so their joint L2 norm is at most ``max_norm``."""
        grads = []
        for p in self.params:
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.coalesce()  # repeated rows summed, so the norm counts each row once
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
        """Dense gradients again, for whoever trains the model next."""
        for table in self.tables:
            table.sparse = False


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


def epoch_sample(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """The example order of one epoch: all ``n`` shuffled, or ``k`` of them drawn without replacement when 0 < k < n."""
    if 0 < k < n:
        return rng.choice(n, k, replace=False)
    return rng.permutation(n)


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


def user_vectors(model: TwoTower, data: Dataset, users: np.ndarray, targets: np.ndarray, batch: int = 4096) -> np.ndarray:
    """User-tower vectors for each user's history before a target position, as of the target's time.

    Returns:
        [len(users), dim] float32.
    """
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(users), batch):
            e = targets[lo : lo + batch]
            w = data.seqs.user_window(users[lo : lo + batch], model.cfg.history, e)
            out.append(model.user_tower(*user_tensors(w, data.seqs.ts[e], device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.dim), np.float32)


def item_vectors(model: TwoTower, data: Dataset, known: np.ndarray) -> np.ndarray:
    """Item-tower vectors for every item id (row 0 = padding).

    Args:
        known: bool [items.size]; items seen in training (the others are cold: side features only).

    Returns:
        [items.size, dim] float32.
    """
    device = next(model.parameters()).device
    model.eval()
    t = lambda a: torch.tensor(a).to(device)
    with torch.no_grad():
        return model.item_vectors(t(data.item_category), t(data.item_tags), t(known)).cpu().numpy()


def known_items(data: Dataset, split: Split) -> np.ndarray:
    """bool [items.size]: items that occur in the training part (their id embedding was trained)."""
    return np.bincount(data.seqs.items[split.train_mask(data.seqs)], minlength=data.items.size) > 0


def recommendable_items(data: Dataset, known: np.ndarray) -> np.ndarray:
    """bool [items.size]: items the recall stage may return.

    Items seen in training or listed in the catalogue. Items that only occur in held-out
    events are not: they would be indexed from side features alone and, being exactly
    the held-out targets, leak the answer into evaluation.
    """
    out = known | data.item_listed
    out[0] = False
    return out


def evaluate_targets(model: TwoTower, data: Dataset, users: np.ndarray, positions: np.ndarray, known: np.ndarray, k: int = 50) -> dict:
    """Full-ranking HR/NDCG/MRR of the two-tower alone for (user, target position) pairs, seen items masked."""
    uv = user_vectors(model, data, users, positions)
    seen = data.seqs.history_matrix(users, positions, data.items.size)
    top, _ = exact_topk(uv, item_vectors(model, data, known), k, exclude=seen, among=recommendable_items(data, known))
    return summarize(target_ranks(top, data.seqs.items[positions]), ks=(10, k))


def _keep_id(ids: torch.Tensor, dropout: float) -> torch.Tensor:
    """Randomly drop id embeddings so the tower also learns to embed items from side features alone."""
    return torch.rand(ids.shape, device=ids.device) >= dropout


class SampledSoftmaxStep(torch.nn.Module):
    """The two-tower's training loss as one module call: both towers and the sampled softmax.

    One forward that uses every trained parameter is what DistributedDataParallel needs
    to average the gradients.

    Args:
        model: the two towers being trained.
        item_category, item_tags: [M] and [M, T] side features per item id.
        log_q: [M] log sampling probability of each item as an in-batch negative (logQ correction).
        uniform_negatives: extra negatives drawn uniformly from the catalogue per step.
    """

    def __init__(self, model: TwoTower, *, item_category: torch.Tensor, item_tags: torch.Tensor, log_q: torch.Tensor, uniform_negatives: int):
        super().__init__()
        self.model = model
        # Plain attributes, not buffers: constant tables, nothing to save or broadcast.
        self.item_category, self.item_tags, self.log_q = item_category, item_tags, log_q
        self.uniform_negatives = uniform_negatives
        self.uniform_log_q = math.log(uniform_negatives / (model.cfg.num_items - 1)) if uniform_negatives else 0.0

    def forward(self, user_inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
        """Mean sampled-softmax loss of the targets [B] given the users' inputs (:func:`user_tensors`)."""
        model, cfg = self.model, self.model.cfg
        u = model.user_tower(*user_inputs)  # [B, d]
        v = self.item_vectors(targets)  # [B, d]
        extra = extra_ids = extra_log_q = None
        if self.uniform_negatives:
            extra_ids = torch.randint(1, cfg.num_items, (self.uniform_negatives,), device=targets.device)
            extra = self.item_vectors(extra_ids)  # [P, d]
            extra_log_q = torch.full((self.uniform_negatives,), self.uniform_log_q, device=targets.device)
        return sampled_softmax_loss(u, v, targets, self.log_q[targets], cfg.temperature, extra, extra_ids, extra_log_q)

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, d] item-tower vectors of ``ids`` [n], each id embedding dropped with the configured rate."""
        return self.model.item_tower(ids, self.item_category[ids], self.item_tags[ids], _keep_id(ids, self.model.cfg.id_dropout))


def train_two_tower(
    data: Dataset,
    split: Split,
    *,
    model_config: TwoTowerConfig | None = None,
    train_config: TwoTowerTrainConfig | None = None,
    init: TwoTower | None = None,
    examples: np.ndarray | None = None,
    progress: bool = True,
) -> tuple[TwoTower, dict]:
    """Train next-item retrieval on every training position; early-stop on validation NDCG@10.

    Args:
        data: the encoded log.
        split: which positions train and which is the validation target (the test
            target is never read).
        model_config: architecture; sized to the vocabularies when omitted.
        train_config: optimisation settings.
        init: a trained model to start from (warm start), grown to the vocabularies
            (``model_config`` is then ignored). The item tower stays fixed for the items
            and categories it had, so their vectors, and an index over them, stay valid;
            new items and categories and the whole user side train.
        examples: bool [N] positions that may be training targets (default: all the
            split's training positions); the rest still serve as history.
        progress: show progress bars.

    Returns:
        The best model (by validation NDCG@10) and a history dict with per-epoch loss and
        validation metrics.
    """
    cfg = train_config or TwoTowerTrainConfig()
    clock = EpochClock(cfg.max_seconds, cfg.budget_epochs)  # the preparation below counts against the budget
    mcfg = model_config or TwoTowerConfig(num_items=data.items.size, num_categories=data.categories.size, num_tags=data.tags.size)
    device = pick_device(cfg.device)
    world = distributed.current()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # the same on every rank: each takes its shard of the same epoch order
    if init is None:
        model = TwoTower(mcfg).to(device)
    else:
        if cfg.weight_decay:
            raise ValueError("a warm start keeps the known items' rows fixed, which weight decay would shrink: use weight_decay=0")
        mcfg = dataclasses.replace(init.cfg, num_items=data.items.size, num_categories=data.categories.size)
        model = grown(init.to(device), mcfg)
    release = _fix_item_space(model, init.cfg) if init is not None else (lambda: None)
    if world.distributed:
        torch.manual_seed(cfg.seed + world.rank)  # each rank draws its own negatives and dropout
    sparse = cfg.sparse_ids and distributed.sparse_gradients_supported()
    opt = SparseTableOptimizer(model, [model.item_tower.item] if sparse else [], cfg.lr, cfg.weight_decay)

    users, positions = split.train_targets(data.seqs)
    if examples is not None:
        users, positions = users[examples[positions]], positions[examples[positions]]
    if len(users) == 0:
        raise ValueError("no training examples: every user needs at least two training events")
    seqs = data.seqs
    targets = seqs.items[positions]
    freq = np.bincount(targets, minlength=mcfg.num_items).astype(np.float64)
    step = SampledSoftmaxStep(
        model,
        item_category=torch.tensor(data.item_category).to(device),
        item_tags=torch.tensor(data.item_tags).to(device),
        log_q=torch.from_numpy(np.log(np.maximum(freq, 1.0) / freq.sum() * cfg.batch_size)).float().to(device),
        uniform_negatives=min(cfg.uniform_negatives, mcfg.num_items - 1),
    )
    trainer = distributed.wrap(step, world)
    known = known_items(data, split)

    valid_users, valid_pos = split.targets("valid")
    max_valid = max(1, min(cfg.max_valid_users, cfg.valid_scores // mcfg.num_items))
    valid_users, valid_pos = subsample(rng, max_valid, valid_users, valid_pos)

    history: dict = {"epochs": [], "config": asdict(cfg), "positions": int(len(users)), "processes": world.size}
    stopper = EarlyStopping(cfg.patience)
    for epoch in range(cfg.epochs):
        if epoch and distributed.any_rank(clock.spent(), world):  # the first epoch always runs: early stopping needs one validated model
            break
        model.train()
        order = distributed.shard(epoch_sample(rng, len(users), cfg.samples_per_epoch), world)
        total, steps, seen = 0.0, 0, 0
        clock.start_epoch()
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"two-tower epoch {epoch + 1}", disable=not progress, leave=False)
        for lo in bar:
            idx = order[lo : lo + cfg.batch_size]
            w = seqs.window(positions[idx], mcfg.history, seqs.offsets[users[idx]])
            loss = trainer(user_tensors(w, seqs.ts[positions[idx]], device), torch.from_numpy(targets[idx]).to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
            seen += len(idx) * world.size
            if distributed.any_rank(clock.epoch_over(), world):
                break
        train_seconds = clock.epoch_seconds()
        metrics = evaluate_targets(model, data, valid_users, valid_pos, known) if len(valid_users) else {}
        score = distributed.from_main(metrics.get("ndcg@10", -total / steps), world)  # one early-stopping decision for all ranks
        record = epoch_record(epoch + 1, total / steps, seen, train_seconds, metrics)
        history["epochs"].append(record)
        log.info("two-tower epoch %d: loss %.4f, %s samples at %s/s%s; valid %s", epoch + 1, total / steps, f"{seen:,}", f"{record['samples_per_s']:,.0f}", clock.left(), brief_metrics(metrics))
        if stopper.step(score, model, epoch + 1):
            break
    log.info("two-tower: kept epoch %d of %d (valid ndcg@10 %.4f)", stopper.best_epoch, len(history["epochs"]), stopper.best)
    close_history(history, stopper, clock)
    opt.finish()
    release()
    return stopper.restore(model), history


def _fix_item_space(model: TwoTower, old: TwoTowerConfig):
    """Hold the item tower of a warm-started model where it was for the ids ``old`` had (see :func:`train_two_tower`).

    Returns:
        A function that lets the whole model train again.
    """
    tower = model.item_tower
    hooks = [freeze_rows(tower.item, old.num_items), freeze_rows(tower.category, old.num_categories)]
    fixed = [*tower.tags.parameters(), *tower.proj.parameters()]
    for p in fixed:
        p.requires_grad_(False)

    def release() -> None:
        for hook in hooks:
            hook.remove()
        for p in fixed:
            p.requires_grad_(True)

    return release
