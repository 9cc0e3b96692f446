"""Train the two-tower model next-item style on every training position."""

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from funnel.evaluation.metrics import summarize, target_ranks
from funnel.events.dataset import Dataset
from funnel.events.split import Split, subsample
from funnel.recall import distributed
from funnel.recall.loop import EpochClock, LoopConfig, Prefetched, SparseTableOptimizer, Validation, pick_device, train_loop
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
        sparse_exchange: under DDP, what the id table's gradients travel as between the
            processes: ``"float32"`` makes N processes take exactly the steps one process
            would take on their joint batch; ``"bfloat16"`` halves the bytes over gloo
            (13.7k rows of 64: 3.1 ms a step instead of 6.1 between two CPU processes)
            at 8 significant bits; ``"auto"``: float32 through shared memory (all
            processes on one host, where bytes cost little), else bfloat16.
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
    sparse_exchange: str = "auto"


def epoch_sample(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """The example order of one epoch: all ``n`` shuffled, or ``k`` of them drawn without replacement when 0 < k < n."""
    if 0 < k < n:
        return rng.choice(n, k, replace=False)
    return rng.permutation(n)


def user_vectors(model: TwoTower, data: Dataset, users: np.ndarray, targets: np.ndarray, batch: int = 4096, now: int | None = None) -> np.ndarray:
    """User-tower vectors for each user's history before a target position, as of the target's time (or ``now``).

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
            ts = data.seqs.ts[e] if now is None else np.full(len(e), now, np.int64)
            out.append(model.user_tower(*user_tensors(w, ts, device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.dim), np.float32)


def serving_user_vectors(model: TwoTower, data: Dataset, users: np.ndarray) -> np.ndarray:
    """User-tower vectors as the server asks the index with them: each user's whole history, as of the log's last event.

    The server measures a known user's time gaps to the end of the bundle's log (or to
    the user's newer events), often days after the user's own last event, and those
    vectors sit further from the items than vectors as of each user's last event: on a
    100k-item synthetic bundle an IVF index found 0.977 of the exact top 200 for the
    latter and 0.934 for the former. An approximate index is checked with these.

    Args:
        users: user ids with at least one event.

    Returns:
        [len(users), dim] float32.
    """
    return user_vectors(model, data, users, data.seqs.offsets[np.asarray(users, np.int64) + 1], now=data.end)


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
    opt = SparseTableOptimizer(model, [model.item_tower.item] if sparse else [], cfg.lr, cfg.weight_decay, world, cfg.sparse_exchange)

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
    trainer = distributed.wrap(step, world, ignore=opt.sparse_parameters, comm_hook=opt.comm_hook)
    known = known_items(data, split)

    valid_users, valid_pos = split.targets("valid")
    max_valid = max(1, min(cfg.max_valid_users, cfg.valid_scores // mcfg.num_items))
    valid_users, valid_pos = subsample(rng, max_valid, valid_users, valid_pos)

    history: dict = {"epochs": [], "config": asdict(cfg), "positions": int(len(users)), "processes": world.size}
    task = _NextItemTask(trainer, data, users, positions, targets, mcfg.history, device, cfg.samples_per_epoch, lambda: _validate(model, data, valid_users, valid_pos, known))
    loop = LoopConfig("two-tower", "samples", "ndcg@10", cfg.epochs, cfg.patience, cfg.batch_size)
    model = train_loop(model, task, opt, loop, clock=clock, world=world, rng=rng, history=history, progress=progress)
    release()
    return model, history


@dataclass
class _NextItemTask:
    """The two-tower's part of the training loop: next-item targets at sampled training positions (:class:`recall.loop.Task`)."""

    trainer: torch.nn.Module
    data: Dataset
    users: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    history: int
    device: torch.device
    samples_per_epoch: int
    validate: Callable[[], Validation]
    _ready: Prefetched = field(default_factory=Prefetched)

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        return epoch_sample(rng, len(self.users), self.samples_per_epoch)

    def prefetch(self, idx: np.ndarray) -> None:
        """Build the inputs of ``idx`` now (the loop calls it while the ranks exchange gradients)."""
        self._ready.put(idx, self._inputs(idx))

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        return self.trainer(*self._ready.take(idx, self._inputs))

    def _inputs(self, idx: np.ndarray) -> tuple:
        """The user windows as tensors and the targets of examples ``idx``."""
        seqs = self.data.seqs
        w = seqs.window(self.positions[idx], self.history, seqs.offsets[self.users[idx]])
        return user_tensors(w, seqs.ts[self.positions[idx]], self.device), torch.from_numpy(self.targets[idx]).to(self.device)


def _validate(model: TwoTower, data: Dataset, users: np.ndarray, positions: np.ndarray, known: np.ndarray) -> Validation:
    metrics = evaluate_targets(model, data, users, positions, known) if len(users) else {}
    return Validation(metrics, metrics, metrics.get("ndcg@10"))


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
