"""Train the ranker on next behaviours against the recall stage's own candidates.

The logs hold no impressions, so for each training position the positive is the
event that happened next and the negatives are candidates the recall stage returned
for that moment that the user did not pick (hard) plus random items (easy). Only
positions whose positive was recalled are used: at serving the ranker only ever
sees recalled items, and their recall score and channel must look the same here.
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from events.dataset import Dataset
from events.metrics import summarize, target_ranks
from events.split import Split
from rank.features import build_features
from rank.model import Ranker, RankerConfig, ranking_loss
from rank.pipeline import TwoStage
from recall.retriever import Retriever
from recall.train import EarlyStopping, pick_device


@dataclass
class RankerTrainConfig:
    """Optimisation and sampling settings."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    hard_negatives: int = 16
    random_negatives: int = 4
    hard_pool: int = 0  # sample hard negatives among the top this-many candidates; 0 = all
    patience: int = 2
    max_examples: int = 300_000
    max_valid_users: int = 5000
    seed: int = 0
    device: str = "auto"


@dataclass
class _Groups:
    users: np.ndarray  # [E]
    positions: np.ndarray  # [E] the positive's position; history is everything before it
    items: np.ndarray  # [E, G] positive first
    scores: np.ndarray  # [E, G] recall scores
    channels: np.ndarray  # [E, G]


def make_groups(data: Dataset, retriever: Retriever, users: np.ndarray, positions: np.ndarray, cfg: RankerTrainConfig, rng: np.random.Generator, batch: int = 4096, progress: bool = False) -> _Groups:
    """Recall candidates for every example, then one (positive, negatives) group each."""
    seqs, num_items = data.seqs, data.items.size
    parts = []
    n = retriever.model.cfg.history
    for lo in tqdm(range(0, len(users), batch), desc="recall for ranker training", disable=not progress, leave=False):
        u, p = users[lo : lo + batch], positions[lo : lo + batch]
        cand = retriever.retrieve(seqs.window(p, n, seqs.offsets[u]), seqs.ts[p], seqs.history_matrix(u, p, num_items))
        target = seqs.items[p]
        hit = cand.items == target[:, None]  # [b, C]
        keep = hit.any(1)
        if not keep.any():
            continue
        u, p, target, hit = u[keep], p[keep], target[keep], hit[keep]
        c_items, c_scores, c_chan, uv = cand.items[keep], cand.scores[keep], cand.channels[keep], cand.user_vecs[keep]
        pos_slot = hit.argmax(1)
        # Negatives come from the whole candidate list (every channel), as the ranker will see at serving.
        pool = min(cfg.hard_pool or c_items.shape[1], c_items.shape[1])
        noise = rng.random((len(u), pool))
        noise[(c_items[:, :pool] == 0) | hit[:, :pool]] = np.inf
        hard_slot = np.argsort(noise, axis=1)[:, : cfg.hard_negatives]
        hard_ok = np.isfinite(np.take_along_axis(noise, hard_slot, axis=1))
        rows = np.arange(len(u))[:, None]
        rand = rng.integers(1, num_items, (len(u), cfg.random_negatives))
        rand = np.where(rand == target[:, None], 0, rand)
        items = np.concatenate([target[:, None], np.where(hard_ok, c_items[rows, hard_slot], 0), rand], axis=1)
        rand_scores = np.einsum("bd,brd->br", uv, retriever.item_vecs[rand])
        scores = np.concatenate([c_scores[rows[:, 0], pos_slot][:, None], c_scores[rows, hard_slot], rand_scores], axis=1)
        channels = np.concatenate([c_chan[rows[:, 0], pos_slot][:, None], c_chan[rows, hard_slot], np.zeros_like(rand)], axis=1)
        parts.append(_Groups(u, p, items, np.where(items > 0, scores, 0).astype(np.float32), np.where(items > 0, channels, 0)))
    if not parts:
        raise ValueError("the recall stage recalled no training positive; cannot train the ranker")
    return _Groups(*(np.concatenate([getattr(g, f) for g in parts]) for f in ("users", "positions", "items", "scores", "channels")))


def evaluate_pipeline(pipeline: TwoStage, data: Dataset, users: np.ndarray, positions: np.ndarray, k: int = 50, batch: int = 1024) -> dict:
    """Full-ranking metrics of the recall stage and of the final ranked list for targets at ``positions``.

    Returns:
        ``{"recall": {...}, "final": {...}}`` with hr/ndcg/mrr at 10 and ``k``.
    """
    seqs = data.seqs
    recall_top, final_top = [], []
    for lo in range(0, len(users), batch):
        u, p = users[lo : lo + batch], positions[lo : lo + batch]
        window = seqs.window(p, pipeline.history, seqs.offsets[u])
        cands, ranked = pipeline.recommend(window, seqs.ts[p], p - seqs.offsets[u], seqs.history_matrix(u, p, data.items.size))
        recall_top.append(_pad(cands.items, k))
        final_top.append(_pad(ranked.items, k))
    targets = seqs.items[positions]
    return {
        "recall": summarize(target_ranks(np.concatenate(recall_top), targets), ks=(10, k)),
        "final": summarize(target_ranks(np.concatenate(final_top), targets), ks=(10, k)),
    }


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
    *,
    model_config: RankerConfig | None = None,
    train_config: RankerTrainConfig | None = None,
    progress: bool = True,
) -> tuple[Ranker, dict]:
    """Train the ranker; early-stop on the validation target's final NDCG@10.

    Args:
        data: the encoded log.
        split: training positions and the validation target (the test target is never read).
        retriever: the trained recall stage (its candidates are the hard negatives).
        item_counts: [M] training interactions per item (a ranking feature).
        model_config: architecture; sized to the vocabularies when omitted.
        train_config: optimisation and sampling settings.
        progress: show progress bars.

    Returns:
        The best ranker and a history dict (per-epoch loss, validation metrics).
    """
    cfg = train_config or RankerTrainConfig()
    mcfg = model_config or RankerConfig(num_items=data.items.size, num_categories=data.categories.size)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    seqs = data.seqs

    users, positions = split.train_targets(seqs)
    if len(users) > cfg.max_examples:
        pick = np.sort(rng.choice(len(users), cfg.max_examples, replace=False))
        users, positions = users[pick], positions[pick]
    groups = make_groups(data, retriever, users, positions, cfg, rng, progress=progress)

    valid_users, valid_pos = split.targets("valid")
    if len(valid_users) > cfg.max_valid_users:
        pick = np.sort(rng.choice(len(valid_users), cfg.max_valid_users, replace=False))
        valid_users, valid_pos = valid_users[pick], valid_pos[pick]

    model = Ranker(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pipeline = TwoStage(retriever, model, item_counts)
    history: dict = {"epochs": [], "config": asdict(cfg), "examples": int(len(groups.users)), "candidates_recall_rate": round(len(groups.users) / max(len(users), 1), 4)}
    stopper = EarlyStopping(cfg.patience)
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(groups.users))
        total, steps = 0.0, 0
        for lo in tqdm(range(0, len(order), cfg.batch_size), desc=f"ranker epoch {epoch + 1}", disable=not progress, leave=False):
            idx = order[lo : lo + cfg.batch_size]
            u, p = groups.users[idx], groups.positions[idx]
            feats = build_features(
                seqs.window(p, mcfg.history, seqs.offsets[u]),
                seqs.ts[p],
                groups.items[idx],
                groups.scores[idx],
                groups.channels[idx],
                item_category=data.item_category,
                item_counts=item_counts,
                user_activity=p - seqs.offsets[u],
                num_gap_buckets=mcfg.gap_buckets,
            ).to_torch(device)
            logits, _ = model(feats)  # [b, G]
            labels = torch.zeros_like(logits, dtype=torch.long)
            labels[:, 0] = 1
            loss = ranking_loss(logits, labels, feats["cand_items"] > 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            total += loss.item()
            steps += 1
        model.eval()
        metrics = evaluate_pipeline(pipeline, data, valid_users, valid_pos) if len(valid_users) else {}
        score = metrics["final"]["ndcg@10"] if metrics else -total / steps
        history["epochs"].append({"epoch": epoch + 1, "loss": round(total / steps, 5), "valid": metrics})
        if progress:
            tqdm.write(f"ranker epoch {epoch + 1}: loss {total / steps:.4f} valid {metrics}")
        if stopper.step(score, model):
            break
    history["best_valid_ndcg@10"] = stopper.best
    return stopper.restore(model), history
