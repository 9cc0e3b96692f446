"""The two stages together: recall candidates, then rank them. Used by training,
evaluation and the server alike, so every path scores exactly the same way."""

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from events.sequences import Window
from rank.features import build_features
from rank.model import Ranker
from recall.retriever import Candidates, Retriever


@dataclass
class Ranked:
    """Candidates re-ordered by the ranker; arrays are [B, C], padding (item 0) last.

    Attributes:
        items, recall_scores, channels: as in :class:`recall.retriever.Candidates`.
        scores: ranker probabilities (0 for padding).
        attention: [B, C, L] the ranker's attention over the user's recent events.
        history_items: [B, L] the recent events the attention refers to.
    """

    items: np.ndarray
    scores: np.ndarray
    recall_scores: np.ndarray
    channels: np.ndarray
    attention: np.ndarray
    history_items: np.ndarray


class TwoStage:
    """Retriever + ranker with the statistics the ranking features need."""

    def __init__(self, retriever: Retriever, ranker: Ranker, item_counts: np.ndarray):
        self.retriever = retriever
        self.ranker = ranker.eval()
        self.item_counts = item_counts

    @property
    def history(self) -> int:
        """Window length that covers both stages."""
        return max(self.retriever.model.cfg.history, self.ranker.cfg.history)

    def rank(self, window: Window, now: np.ndarray, user_activity: np.ndarray, candidates: Candidates) -> Ranked:
        """Score given candidates and sort them by the ranker.

        Args:
            window: recent behaviour, at least ``ranker.cfg.history`` long.
            now: [B] request times.
            user_activity: [B] events in each user's whole history.
            candidates: from :meth:`Retriever.retrieve`.
        """
        w = window.tail(self.ranker.cfg.history)
        feats = build_features(
            w,
            now,
            candidates.items,
            candidates.scores,
            candidates.channels,
            item_category=self.retriever.item_category,
            item_counts=self.item_counts,
            user_activity=user_activity,
            num_gap_buckets=self.ranker.cfg.gap_buckets,
        )
        device = next(self.ranker.parameters()).device
        with torch.no_grad():
            logits, attention = self.ranker(feats.to_torch(device))
        probs = torch.sigmoid(logits).cpu().numpy()
        probs = np.where(candidates.items > 0, probs, -np.inf)
        order = np.argsort(-probs, axis=1, kind="stable")
        take = lambda a: np.take_along_axis(a, order, axis=1)
        return Ranked(
            items=take(candidates.items),
            scores=np.where(np.isfinite(take(probs)), take(probs), 0.0).astype(np.float32),
            recall_scores=take(candidates.scores),
            channels=take(candidates.channels),
            attention=np.take_along_axis(attention.cpu().numpy(), order[..., None], axis=1),
            history_items=w.items,
        )

    def recommend(self, window: Window, now: np.ndarray, user_activity: np.ndarray, exclude: sp.csr_matrix, category: int | None = None) -> tuple[Candidates, Ranked]:
        """Both stages for a batch of users.

        Args:
            window: recent behaviour, at least :attr:`history` long.
            now: [B] request times.
            user_activity: [B] events in each user's whole history.
            exclude: [B, M] items never to return (seen, excluded by the caller).
            category: only items of this category id.

        Returns:
            The recall candidates (recall order) and the ranked list.
        """
        candidates = self.retriever.retrieve(window.tail(self.retriever.model.cfg.history), now, exclude, category)
        return candidates, self.rank(window, now, user_activity, candidates)
