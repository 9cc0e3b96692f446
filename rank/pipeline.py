"""The two stages together: recall candidates, then rank them. Used by training,
evaluation and the server alike, so every path scores exactly the same way."""

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from funnel.events.sequences import Window
from funnel.rank.business import BusinessTables
from funnel.rank.features import FeatureTables, RankFeatures, build_features
from funnel.rank.model import Ranker, combine_heads, frozen_ranker, head_probabilities
from funnel.recall.lookup import best_first_columns
from funnel.recall.retriever import Candidates, Excluded, Retriever
from funnel.recall.runtime import OnnxModel


@dataclass
class Ranked:
    """Candidates re-ordered by the ranker; arrays are [B, C], padding (item 0) last.

    Attributes:
        items, recall_scores, channels: as in :class:`recall.retriever.Candidates`.
        scores: the final score, the weighted combination of ``head_scores``
            (:func:`rank.model.combine_heads`; 0 for padding).
        head_scores: head name ("click", and on behaviour logs "cart_fav", "buy") ->
            [B, C] probabilities, in the same order as ``items``.
        attention: [B, C, L] the ranker's attention over the user's recent events; None
            unless asked for (only explanations show it).
        history_items, history_behaviors, history_ts: [B, L] the recent events the
            attention refers to (0 = padding).
        recall_ranks: [B, C] each item's position in the recall list (a ranking feature).
    """

    items: np.ndarray
    scores: np.ndarray
    recall_scores: np.ndarray
    channels: np.ndarray
    attention: np.ndarray | None
    history_items: np.ndarray
    head_scores: dict[str, np.ndarray]
    history_behaviors: np.ndarray
    history_ts: np.ndarray
    recall_ranks: np.ndarray


Scorer = Callable[[RankFeatures, bool], tuple[np.ndarray, np.ndarray | None]]
"""Ranker features -> (logits [B, C, H], attention [B, C, L] when the flag asks for it, else None)."""


@dataclass
class Recommended:
    """What :meth:`TwoStage.recommend` returns: both stages' output and their wall-clock seconds."""

    candidates: Candidates
    ranked: Ranked
    recall_s: float
    rank_s: float


class TwoStage:
    """Retriever + ranker with the statistics the ranking features need.

    Args:
        retriever: the recall stage (its co-visitation graph is also a ranking feature).
        ranker: the ranking model.
        item_counts: [M] training interactions per item id.
        business: the bundle's business tables.
        fitted: the registered feature groups' own statistics (:func:`rank.schema.fit_feature_tables`).
    """

    def __init__(self, retriever: Retriever, ranker: Ranker, item_counts: np.ndarray, business: BusinessTables, fitted: dict[str, dict[str, np.ndarray]] | None = None):
        self.retriever = retriever
        self.ranker = ranker.eval()
        self.device = next(ranker.parameters()).device
        self._score: Scorer = self._torch_scorer(self.ranker)
        self.tables = FeatureTables(retriever.item_category, item_counts, business, retriever.channel("covisit"), fitted or {})

    def freeze(self) -> None:
        """Score with a frozen TorchScript copy of the ranker from now on (:func:`rank.model.frozen_ranker`).

        For serving and evaluation of a finished bundle; a pipeline whose ranker is still
        training must not be frozen, since the copy would not follow its weights.
        """
        self._score = self._torch_scorer(frozen_ranker(self.ranker))

    def use_onnx(self, path: str) -> None:
        """Score with ONNX Runtime over the ranker's export at ``path`` (:func:`rank.model.export_ranker`) from now on.

        Two sessions: the whole graph, and its logits alone for the calls that need no
        attention (ONNX Runtime runs every node of a graph whatever outputs are asked for).
        """
        both, logits_only = OnnxModel(path), OnnxModel(path, outputs=("logits",))

        def score(feats: RankFeatures, attention: bool) -> tuple[np.ndarray, np.ndarray | None]:
            if attention:
                logits, weights = both(**feats.arrays())
                return logits, weights
            return logits_only(**feats.arrays())[0], None

        self._score = score

    def _torch_scorer(self, ranker: torch.nn.Module) -> Scorer:
        def score(feats: RankFeatures, attention: bool) -> tuple[np.ndarray, np.ndarray | None]:
            with torch.inference_mode():
                logits, weights = ranker(feats.to_torch(self.device))
            return logits.cpu().numpy(), weights.cpu().numpy() if attention else None

        return score

    @property
    def history(self) -> int:
        """Window length that covers both stages."""
        return max(self.retriever.model.cfg.history, self.ranker.cfg.history)

    def features(self, window: Window, now: np.ndarray, user_activity: np.ndarray, candidates: Candidates) -> RankFeatures:
        """The ranking features of recalled candidates, exactly as :meth:`rank` scores them.

        Args:
            window: recent behaviour, at least ``ranker.cfg.history`` long.
            now: [B] request times.
            user_activity: [B] events in each user's whole history.
            candidates: from :meth:`Retriever.retrieve` (recall order, so a column is a recall rank).
        """
        ranks = np.broadcast_to(np.arange(candidates.items.shape[1]), candidates.items.shape)
        return build_features(
            window.tail(self.ranker.cfg.history),
            now,
            candidates.items,
            candidates.scores,
            candidates.channels,
            ranks,
            user_activity=user_activity,
            tables=self.tables,
            num_gap_buckets=self.ranker.cfg.gap_buckets,
        )

    def rank(
        self,
        window: Window,
        now: np.ndarray,
        user_activity: np.ndarray,
        candidates: Candidates,
        head_weights: dict[str, float] | None = None,
        attention: bool = False,
    ) -> Ranked:
        """Score given candidates and sort them by the final score.

        Args:
            window: recent behaviour, at least ``ranker.cfg.history`` long.
            now: [B] request times.
            user_activity: [B] events in each user's whole history.
            candidates: from :meth:`Retriever.retrieve`.
            head_weights: per-head weights overriding the ranker's defaults
                (``ranker.cfg.head_weights``) for the heads they name.
            attention: also return the ranker's attention (for explanations; it costs a
                [B, C, L] output).

        Returns:
            The candidates sorted by final score, with per-head scores (and attention if asked for).
        """
        w = window.tail(self.ranker.cfg.history)
        return self.order(w, candidates, self.features(w, now, user_activity, candidates), head_weights, attention)

    def order(
        self, window: Window, candidates: Candidates, feats: RankFeatures, head_weights: dict[str, float] | None = None, attention: bool = False
    ) -> Ranked:
        """Score candidates whose features are already built (:meth:`features`) and sort them.

        Args:
            window: the recent behaviour the features were built from (``ranker.cfg.history`` long).
            candidates: the recalled candidates, recall order.
            feats: their features.
            head_weights, attention: as in :meth:`rank`.

        Returns:
            As :meth:`rank`.
        """
        logits, weights = self._score(feats, attention)  # [B, C, H], [B, C, L] or None
        probs, final = self._final(logits, head_weights)
        heads = np.stack(list(probs.values()), axis=-1)  # [B, C, H]
        order, items, recall_scores, channels, scores = best_first_columns(candidates.items, final, heads, candidates.scores, candidates.channels)  # scores [B, C, 1 + H]
        return Ranked(
            items=items,
            scores=scores[..., 0],
            recall_scores=recall_scores,
            channels=channels,
            attention=None if weights is None else np.take_along_axis(weights, order[..., None], axis=1),
            history_items=window.items,
            head_scores={h: scores[..., 1 + i] for i, h in enumerate(probs)},
            history_behaviors=window.behaviors,
            history_ts=window.ts,
            recall_ranks=order,
        )

    def _final(self, logits: np.ndarray, head_weights: dict[str, float] | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per-head probabilities and the final score of ranker logits [..., H]; ``head_weights`` override the ranker's own.

        In numpy: on a few hundred scores each torch op would cost more than its arithmetic.
        """
        cfg = self.ranker.cfg
        probs = head_probabilities(logits, cfg.heads)
        return probs, combine_heads(probs, {**cfg.head_weights, **(head_weights or {})})

    def event_effects(
        self, window: Window, now: np.ndarray, user_activity: np.ndarray, ranked: Ranked, k: int, head_weights: dict[str, float] | None = None
    ) -> np.ndarray:
        """How much each recent event raises each of the top ``k`` ranked items' final scores.

        The effect of event ``l`` on item ``j`` is ``j``'s final score minus its score when
        ``l`` is left out of the history (the earlier events move up one place), with the
        item's recall score, channel and rank kept: what the ranker itself makes of that
        event, every feature included, not what its attention suggests. All leave-one-out
        histories of a batch go through one ranker call: ``L`` times the rows of ``k``
        candidates each.

        Args:
            window: the recent behaviour :meth:`rank` was given.
            now, user_activity: as given to :meth:`rank`.
            ranked: its output.
            k: items explained per row (the first ``k`` of ``ranked``).
            head_weights: as given to :meth:`rank`.

        Returns:
            float32 [B, k, L] over ``ranked.history_items`` columns; 0 for padding events and padding items.
        """
        w = window.tail(self.ranker.cfg.history)
        b, n = w.items.shape
        k = min(k, ranked.items.shape[1])
        # Variant l drops column l: columns before it shift right by one, column 0 becomes padding.
        cols = np.arange(n)
        source = np.where(cols[None, :] <= cols[:, None], cols[None, :] - 1, cols[None, :])  # [L variants, L]
        gather = lambda a: np.where(source >= 0, a[:, np.maximum(source, 0)], 0)  # [B, L, L]
        real = w.items > 0  # [B, L]
        dropped = Window(
            gather(w.items).reshape(b * n, n),
            gather(w.categories).reshape(b * n, n),
            gather(w.behaviors).reshape(b * n, n),
            gather(w.ts).reshape(b * n, n),
            np.repeat(w.lengths, n) - real.reshape(-1),
        )
        repeat = lambda a: np.repeat(a[:, :k], n, axis=0)  # [B * L, k]: each row's candidates once per variant
        feats = build_features(
            dropped,
            np.repeat(now, n),
            repeat(ranked.items),
            repeat(ranked.recall_scores),
            repeat(ranked.channels),
            repeat(ranked.recall_ranks),
            user_activity=np.repeat(user_activity, n) - real.reshape(-1),
            tables=self.tables,
            num_gap_buckets=self.ranker.cfg.gap_buckets,
        )
        logits, _ = self._score(feats, False)  # [B * L, k, H]
        _, without = self._final(logits, head_weights)
        effects = ranked.scores[:, None, :k] - without.reshape(b, n, k)  # [B, L, k]
        effects = np.where(real[:, :, None] & (ranked.items[:, None, :k] > 0), effects, 0.0)
        return effects.transpose(0, 2, 1).astype(np.float32)  # [B, k, L]

    def recommend(
        self,
        window: Window,
        now: np.ndarray,
        user_activity: np.ndarray,
        exclude: "sp.csr_matrix | Excluded",
        category: int | None = None,
        head_weights: dict[str, float] | None = None,
        two_tower: int = 0,
        attention: bool = False,
    ) -> Recommended:
        """Both stages for a batch of users: the request path the server and ``funnel evaluate`` share.

        Args:
            window: recent behaviour, at least :attr:`history` long.
            now: [B] request times.
            user_activity: [B] events in each user's whole history.
            exclude: [B, M] sparse, or per-user id arrays (:class:`recall.retriever.Excluded`):
                items never to return (seen, excluded by the caller).
            category: only items of this category id.
            head_weights, attention: as in :meth:`rank`.
            two_tower: ask the two-tower channel for at least this many candidates.

        Returns:
            The recall candidates (recall order), the ranked list and each stage's seconds.
        """
        started = time.perf_counter()
        candidates = self.retriever.retrieve(window.tail(self.retriever.model.cfg.history), now, exclude, category, two_tower=two_tower)
        recalled = time.perf_counter()
        ranked = self.rank(window, now, user_activity, candidates, head_weights, attention)
        return Recommended(candidates, ranked, recalled - started, time.perf_counter() - recalled)
