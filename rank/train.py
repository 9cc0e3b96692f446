"""Train the ranker on next behaviours against the recall stage's own candidates.

The logs hold no impressions, so for each training position the positive is the
event that happened next and the negatives are candidates the recall stage returned
for that moment that the user did not pick (hard: the top of the list always, more
drawn from the rest) plus random items (easy). Only positions whose positive was
recalled are used: at serving the ranker only ever sees recalled items, and their
recall score, rank and channel must look the same here.

The ranker trains on each user's last few training positions, featured by a view of
the recall stage whose co-visitation graph, popularity and business tables are refitted
on the events before them (:func:`held_out_view`). Fitted on the whole training part,
those tables would have counted each positive itself: co-visitation then all but names
the positive, the ranker learns to trust it, and at serving, where the target is
new, that trust is misplaced. Training reads training positions only and early-stops on
the validation target; the test target is never read.
"""

import dataclasses
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from funnel.evaluation.metrics import summarize, target_ranks
from funnel.events.dataset import Dataset
from funnel.events.schema import BEHAVIOR_CODE
from funnel.events.split import Split, subsample
from funnel.rank.business import BusinessTables, item_table
from funnel.rank.features import FeatureTables, RankFeatures, build_features, recall_ranks
from funnel.rank.model import HEAD_BEHAVIORS, HEADS, Ranker, RankerConfig, ranking_loss
from funnel.rank.pipeline import TwoStage
from funnel.rank.schema import fit_feature_tables
from funnel.recall import distributed
from funnel.recall.loop import EpochClock, LoopConfig, Prefetched, SparseTableOptimizer, Validation, pick_device, train_loop
from funnel.recall.plugin import fit_channels
from funnel.recall.retriever import Candidates, Retriever
from funnel.recall.warm import grown

log = logging.getLogger("funnel.train")


@dataclass
class RankerTrainConfig:
    """Optimisation and sampling settings.

    Attributes:
        top_negatives: the best-ranked recall candidates the user did not pick, always
            in the group (the ones the final list is decided among).
        hard_negatives: further recall candidates, drawn uniformly from the rest of the
            list (or of its first ``hard_pool`` entries when ``hard_pool`` > 0).
        random_negatives: uniformly random catalogue items; the hard : random ratio is
            ``top_negatives + hard_negatives : random_negatives``.
        holdout: train on each user's last this-many training positions, featured by
            channels and tables fitted on the events before them (:func:`held_out_view`).
        max_examples: cap on training groups (a random subset beyond it). Their features
            are built once and kept in memory, about 13 kB per group at the default sizes.
        listwise_weight: weight of the listwise softmax term against the pointwise log-loss.
        weight_decay: decoupled L2 (AdamW) on every weight.
        max_seconds, budget_epochs: the time budget (0: none) of the ranker's training,
            its groups and validation set included, cut into at least this many validated
            epochs (:class:`recall.loop.EpochClock`).
        sparse_ids: the item id table trains with sparse gradients and a lazy Adam
            (:class:`recall.loop.SparseTableOptimizer`, no weight decay on it): at 870k
            items a step of 128 groups takes 123 ms instead of 540 ms on one thread.
        sparse_exchange: under DDP, what the id table's gradients travel as between the
            processes: ``"float32"`` makes N processes take exactly the steps one process
            would take on their joint batch; ``"bfloat16"`` halves the bytes over gloo
            (13.7k rows of 64: 3.1 ms a step instead of 6.1 between two CPU processes)
            at 8 significant bits; ``"auto"``: float32 through shared memory (all
            processes on one host, where bytes cost little), else bfloat16.
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    top_negatives: int = 16
    hard_negatives: int = 32
    random_negatives: int = 8
    hard_pool: int = 0
    holdout: int = 10
    patience: int = 3
    max_examples: int = 100_000
    max_valid_users: int = 5000
    listwise_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    max_seconds: float = 0.0
    budget_epochs: int = 8
    sparse_ids: bool = True
    sparse_exchange: str = "auto"


@dataclass
class Groups:
    """One (positive, negatives) group per training example; [E, G] arrays have the positive in column 0.

    Attributes:
        users, positions: [E] the example's user and the positive's position (its history is everything before).
        items, scores, channels, ranks: [E, G] group items (0 = padding) with their recall
            score, channel and rank in the recall list.
        behaviors: [E] the positive's behaviour code.
    """

    users: np.ndarray
    positions: np.ndarray
    items: np.ndarray
    scores: np.ndarray
    channels: np.ndarray
    ranks: np.ndarray
    behaviors: np.ndarray


def make_groups(
    data: Dataset, retriever: Retriever, users: np.ndarray, positions: np.ndarray, cfg: RankerTrainConfig, rng: np.random.Generator, batch: int = 2048, progress: bool = False
) -> Groups:
    """Recall candidates for every example, then one (positive, negatives) group each.

    Args:
        data: the encoded log.
        retriever: the recall stage.
        users, positions: [E] training examples (the positive is the event at the position).
        cfg: sampling settings.
        rng: random source.
        batch: examples recalled at a time.
        progress: show a progress bar.

    Returns:
        The groups of examples whose positive was recalled.

    Raises:
        ValueError: if no positive was recalled at all.
    """
    seqs, num_items = data.seqs, data.items.size
    parts = []
    n = retriever.model.cfg.history
    for lo in tqdm(range(0, len(users), batch), desc="recall for ranker training", disable=not progress, leave=False):
        u, p = users[lo : lo + batch], positions[lo : lo + batch]
        cand = retriever.retrieve(seqs.window(p, n, seqs.offsets[u]), seqs.ts[p], seqs.history_matrix(u, p, num_items))
        target = seqs.items[p]
        keep = (cand.items == target[:, None]).any(1)
        if keep.any():
            parts.append(_group(cand, keep, u[keep], p[keep], target[keep], seqs.behaviors[p[keep]], retriever.item_vecs, num_items, cfg, rng))
    if not parts:
        raise ValueError("the recall stage recalled no training positive; cannot train the ranker")
    return Groups(*(np.concatenate([getattr(g, f) for g in parts]) for f in Groups.__dataclass_fields__))


def _group(
    cand: Candidates, keep: np.ndarray, u: np.ndarray, p: np.ndarray, target: np.ndarray, behaviors: np.ndarray, item_vecs: np.ndarray, num_items: int, cfg: RankerTrainConfig, rng: np.random.Generator
) -> Groups:
    items, scores, chans, uv = cand.items[keep], cand.scores[keep], cand.channels[keep], cand.user_vecs[keep]
    b, c = items.shape
    rows = np.arange(b)[:, None]
    hit = items == target[:, None]  # [b, C]
    pos_slot = hit.argmax(1)
    # Slot order: the top non-positive candidates in list order, then a uniform draw from the (pooled) rest.
    negative = (items > 0) & ~hit  # [b, C]
    is_top = negative & (np.cumsum(negative, axis=1) <= cfg.top_negatives)
    drawable = negative & ~is_top & (np.arange(c) < min(cfg.hard_pool or c, c))
    key = np.where(is_top, np.arange(c) / c - 1.0, np.where(drawable, rng.random((b, c)), np.inf))  # top < 0 <= drawn < inf
    ranked = np.argsort(key, axis=1, kind="stable")
    top_ok = np.isfinite(np.take_along_axis(key, ranked, axis=1))
    want = cfg.top_negatives + cfg.hard_negatives
    slots = ranked[:, :want]
    ok = top_ok[:, :want]
    if slots.shape[1] < want:
        slots = np.pad(slots, ((0, 0), (0, want - slots.shape[1])))
        ok = np.pad(ok, ((0, 0), (0, want - ok.shape[1])))
    rand = rng.integers(1, num_items, (b, cfg.random_negatives))
    rand = np.where((rand == target[:, None]) | _in_rows(rand, items), 0, rand)
    rand_scores = np.einsum("bd,brd->br", uv, item_vecs[rand]).astype(np.float32)
    g_items = np.concatenate([target[:, None], np.where(ok, items[rows, slots], 0), rand], axis=1)
    g_scores = np.concatenate([scores[rows[:, 0], pos_slot][:, None], scores[rows, slots], rand_scores], axis=1)
    g_chans = np.concatenate([chans[rows[:, 0], pos_slot][:, None], chans[rows, slots], np.zeros_like(rand)], axis=1)
    g_ranks = np.concatenate([pos_slot[:, None], slots, recall_ranks(rand_scores, scores)], axis=1)
    real = g_items > 0
    return Groups(u, p, g_items, np.where(real, g_scores, 0).astype(np.float32), np.where(real, g_chans, 0), np.where(real, g_ranks, 0), behaviors)


def _in_rows(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[b, r] whether each id also appears in the same row of ``rows`` [b, C]."""
    return (ids[:, :, None] == rows[:, None, :]).any(-1)


def head_labels(behaviors: np.ndarray, group_width: int, heads: tuple[str, ...]) -> np.ndarray:
    """Per-head labels of groups whose positive (column 0) had behaviour ``behaviors``.

    Args:
        behaviors: [E] behaviour codes of the positives.
        group_width: G.
        heads: head names.

    Returns:
        int64 [E, G, H]: column 0 is 1 for ``click`` and for the head matching the
        behaviour (cart or fav → ``cart_fav``, buy → ``buy``); negatives are 0.
    """
    labels = np.zeros((len(behaviors), group_width, len(heads)), np.int64)
    for i, h in enumerate(heads):
        labels[:, 0, i] = np.isin(behaviors, [BEHAVIOR_CODE[b] for b in HEAD_BEHAVIORS[h]])
    return labels


def heads_for(behaviors: np.ndarray) -> tuple[str, ...]:
    """The heads a log supports: ``click`` always, ``cart_fav`` and ``buy`` where those behaviours occur."""
    present = {
        "cart_fav": bool(np.isin(behaviors, (BEHAVIOR_CODE["cart"], BEHAVIOR_CODE["fav"])).any()),
        "buy": bool((behaviors == BEHAVIOR_CODE["buy"]).any()),
    }
    return tuple(h for h in HEADS if h == "click" or present[h])


@dataclass
class HeldOutView:
    """The recall stage as it stood before each user's last training positions.

    Attributes:
        retriever: the trained two-tower with co-visitation and popularity refitted on
            the earlier events only.
        tables: feature tables from the same earlier events.
        users, positions: [E] the held-out training positions the ranker trains on.
    """

    retriever: Retriever
    tables: FeatureTables
    users: np.ndarray
    positions: np.ndarray


def held_out_view(data: Dataset, split: Split, retriever: Retriever, business: BusinessTables, holdout: int) -> HeldOutView:
    """Refit the count-based parts of the recall stage without each user's last ``holdout`` training positions.

    The time-aware popularity needs no refit: it only counts events before the request
    time. Refitting it would even distort it, since the held-out events are the ones
    nearest each position's time.

    Args:
        data: the encoded log.
        split: the split the recall stage was trained on.
        retriever: the trained recall stage (its two-tower is kept).
        business: business tables of the whole training part (their time-aware popularity is kept).
        holdout: training positions held out per user (users keep at least their first event).

    Returns:
        The view, and the held-out positions (each with at least one earlier event).
    """
    seqs = data.seqs
    first = np.minimum(np.maximum(split.train_end - holdout, seqs.offsets[:-1] + 1), split.train_end)
    mask = dataclasses.replace(split, train_end=first).train_mask(seqs)
    # The same channels, refitted on the earlier part: what the held-out positions' candidates would have come from.
    channels = fit_channels(data, mask, like=retriever.channels)
    view = Retriever(retriever.model, retriever.item_vecs, retriever.index, channels, retriever.item_category, retriever.config, retriever.recommendable)
    earlier = BusinessTables(item_table(seqs, mask, data.item_category), business.event_keys)
    tables = FeatureTables(data.item_category, view.channel("popular").counts, earlier, view.channel("covisit"), fit_feature_tables(data, mask))
    users, positions = split.train_targets(seqs)
    keep = positions >= first[users]
    return HeldOutView(view, tables, users[keep], positions[keep])


def group_features(data: Dataset, groups: Groups, tables: FeatureTables, cfg: RankerConfig, batch: int = 4096) -> RankFeatures:
    """The ranking features of every group, built once (they do not change between epochs)."""
    seqs = data.seqs
    parts = []
    for lo in range(0, len(groups.users), batch):
        u, p = groups.users[lo : lo + batch], groups.positions[lo : lo + batch]
        sl = slice(lo, lo + batch)
        parts.append(
            build_features(
                seqs.window(p, cfg.history, seqs.offsets[u]),
                seqs.ts[p],
                groups.items[sl],
                groups.scores[sl],
                groups.channels[sl],
                groups.ranks[sl],
                user_activity=p - seqs.offsets[u],
                tables=tables,
                num_gap_buckets=cfg.gap_buckets,
            )
        )
    return RankFeatures.concat(parts)


class ValidationSet:
    """Recall candidates and their ranking features for validation targets, built once
    and re-ranked every epoch.

    Args:
        pipeline: the two stages (its ranker is what changes between epochs).
        data: the encoded log.
        users, positions: the targets.
        batch: users per ranking call.
    """

    def __init__(self, pipeline: TwoStage, data: Dataset, users: np.ndarray, positions: np.ndarray, batch: int = 512):
        seqs = data.seqs
        self.pipeline = pipeline
        self.targets = seqs.items[positions]
        self.batches = []
        for lo in range(0, len(users), batch):
            u, p = users[lo : lo + batch], positions[lo : lo + batch]
            window = seqs.window(p, pipeline.history, seqs.offsets[u])
            now = seqs.ts[p]
            cands = pipeline.retriever.retrieve(window.tail(pipeline.retriever.model.cfg.history), now, seqs.history_matrix(u, p, data.items.size))
            ranked = window.tail(pipeline.ranker.cfg.history)
            self.batches.append((ranked, cands, pipeline.features(ranked, now, p - seqs.offsets[u], cands)))

    def __len__(self) -> int:
        return len(self.targets)

    def evaluate(self, k: int = 50) -> dict:
        """``{"recall": {...}, "final": {...}}`` full-ranking metrics (hr/ndcg/mrr at 10 and ``k``)."""
        recall_top = [_pad(c.items, k) for _, c, _ in self.batches]
        final_top = [_pad(self.pipeline.order(w, c, f).items, k) for w, c, f in self.batches]
        return {
            "recall": summarize(target_ranks(np.concatenate(recall_top), self.targets), ks=(10, k)),
            "final": summarize(target_ranks(np.concatenate(final_top), self.targets), ks=(10, k)),
        }


def evaluate_pipeline(pipeline: TwoStage, data: Dataset, users: np.ndarray, positions: np.ndarray, k: int = 50, batch: int = 512) -> dict:
    """Full-ranking metrics of the recall stage and of the final ranked list for targets at ``positions``.

    Returns:
        ``{"recall": {...}, "final": {...}}`` with hr/ndcg/mrr at 10 and ``k``.
    """
    return ValidationSet(pipeline, data, users, positions, batch).evaluate(k)


def _pad(items: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(items), k), -1, dtype=np.int64)
    w = min(k, items.shape[1])
    out[:, :w] = np.where(items[:, :w] > 0, items[:, :w], -1)
    return out


def train_ranker(
    data: Dataset,
    split: Split,
    retriever: Retriever,
    item_counts: np.ndarray,
    business: BusinessTables,
    *,
    fitted: dict[str, dict[str, np.ndarray]] | None = None,
    model_config: RankerConfig | None = None,
    train_config: RankerTrainConfig | None = None,
    init: Ranker | None = None,
    examples: np.ndarray | None = None,
    progress: bool = True,
) -> tuple[Ranker, dict]:
    """Train the ranker; early-stop on the validation target's final NDCG@10.

    Args:
        data: the encoded log.
        split: training positions and the validation target (the test target is never read).
        retriever: the trained recall stage (its candidates are the hard negatives).
        item_counts: [M] training interactions per item (a ranking feature).
        business: business tables of the training part (ranking features).
        fitted: the registered feature groups' own statistics over the training part
            (:func:`rank.schema.fit_feature_tables`; fitted here when omitted).
        model_config: architecture; sized to the vocabularies, with heads for the
            behaviours the training part holds, when omitted.
        train_config: optimisation and sampling settings.
        init: a trained ranker to start from (warm start), its tables grown to the
            vocabularies (``model_config`` is then ignored).
        examples: bool [N] positions that may be training positives (default: each
            user's last training positions, see :class:`RankerTrainConfig`).
        progress: show progress bars.

    Returns:
        The best ranker and a history dict (per-epoch loss, validation metrics).
    """
    cfg = train_config or RankerTrainConfig()
    clock = EpochClock(cfg.max_seconds, cfg.budget_epochs)  # the preparation below counts against the budget
    seqs = data.seqs
    mcfg = model_config or RankerConfig(
        num_items=data.items.size,
        num_categories=data.categories.size,
        num_channels=len(retriever.channel_names),
        heads=heads_for(seqs.behaviors[split.train_mask(seqs)]),
    )
    if init is not None:
        mcfg = dataclasses.replace(init.cfg, num_items=data.items.size, num_categories=data.categories.size)
    device = pick_device(cfg.device)
    world = distributed.current()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # the same on every rank: they build the same groups and shard each epoch's order

    view = held_out_view(data, split, retriever, business, cfg.holdout)
    users, positions = view.users, view.positions
    if examples is not None:
        users, positions = users[examples[positions]], positions[examples[positions]]
    users, positions = subsample(rng, cfg.max_examples, users, positions)
    groups = make_groups(data, view.retriever, users, positions, cfg, rng, progress=progress)
    feats = group_features(data, groups, view.tables, mcfg)
    del view  # its refitted graph and tables (GBs at 100M events) are not needed past the features
    labels = head_labels(groups.behaviors, groups.items.shape[1], mcfg.heads)

    model = Ranker(mcfg).to(device) if init is None else grown(init.to(device), mcfg)
    if fitted is None:
        fitted = fit_feature_tables(data, split.train_mask(seqs))
    pipeline = TwoStage(retriever, model, item_counts, business, fitted)
    valid_users, valid_pos = split.targets("valid")
    valid_users, valid_pos = subsample(rng, cfg.max_valid_users, valid_users, valid_pos)
    valid = ValidationSet(pipeline, data, valid_users, valid_pos)

    sparse = cfg.sparse_ids and distributed.sparse_gradients_supported()
    opt = SparseTableOptimizer(model, [model.item] if sparse else [], cfg.lr, cfg.weight_decay, world, cfg.sparse_exchange)
    history: dict = {
        "epochs": [],
        "config": asdict(cfg),
        "heads": list(mcfg.heads),
        "examples": int(len(groups.users)),
        "candidates_recall_rate": round(len(groups.users) / max(len(users), 1), 4),
        "processes": world.size,
    }
    task = _GroupTask(distributed.wrap(model, world, ignore=opt.sparse_parameters, comm_hook=opt.comm_hook), feats, labels, mcfg.heads, cfg.listwise_weight, device, valid)
    loop = LoopConfig("ranker", "groups", "final ndcg@10", cfg.epochs, cfg.patience, cfg.batch_size, cfg.grad_clip)
    return train_loop(model, task, opt, loop, clock=clock, world=world, rng=rng, history=history, progress=progress), history


@dataclass
class _GroupTask:
    """The ranker's part of the training loop: each group's positive against its negatives (:class:`recall.loop.Task`)."""

    trainer: torch.nn.Module
    feats: RankFeatures
    labels: np.ndarray
    heads: tuple[str, ...]
    listwise_weight: float
    device: torch.device
    valid: "ValidationSet"
    _ready: Prefetched = field(default_factory=Prefetched)

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(self.labels))

    def prefetch(self, idx: np.ndarray) -> None:
        """Gather the features of ``idx`` now (the loop calls it while the ranks exchange gradients)."""
        self._ready.put(idx, self._batch(idx))

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        batch = self._ready.take(idx, self._batch)
        logits, _ = self.trainer(batch)  # [b, G, H]
        return ranking_loss(logits, torch.from_numpy(self.labels[idx]).to(self.device), batch["cand_items"] > 0, self.heads, self.listwise_weight)

    def _batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        return self.feats.take(idx).to_torch(self.device)

    def validate(self) -> Validation:
        metrics = self.valid.evaluate() if len(self.valid) else {}
        return Validation(metrics, metrics.get("final", {}), metrics["final"]["ndcg@10"] if metrics else None)
