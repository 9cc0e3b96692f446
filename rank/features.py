"""Ranking features for (user, candidate) pairs, one function for training, evaluation and serving.

Using the same function everywhere is what keeps offline and online features equal:
training, ``funnel evaluate`` and the server all reach :func:`build_features` with
the tables of one bundle (:class:`FeatureTables`). Importing this module registers the
built-in features (:mod:`rank.schema`), so the ranker's width is read from here.
"""

__all__ = ["FeatureTables", "RankFeatures", "build_features", "dense_names", "recall_ranks"]

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from funnel.events.sequences import Window
from funnel.events.timegap import gap_buckets
from funnel.rank.business import ITEM_FEATURES, POPULARITY_WINDOWS_S, USER_FEATURES, BusinessTables, user_business_features
from funnel.rank.kernels import builtin_dense, candidate_columns
from funnel.rank.schema import FeatureBatch, dense_names, groups, register_features
from funnel.recall.channels import CoVisitation, recency_weights
from funnel.recall.lookup import kernel_array

CANDIDATE_COLUMNS = (
    "recall_score",
    "recall_rank",
    "log_count",
    "category_share",
    "category_share_short",
    "covisit_recent",
    "covisit_last",
    "seen_share",
    "seen_hours",
    "seen_cart_fav",
    "seen_buy",
)
POPULARITY_COLUMNS = tuple(f"popularity_{w // 86_400}d" for w in POPULARITY_WINDOWS_S) + ("popularity_before",)
USER_COLUMNS = ("user_activity",) + USER_FEATURES

SHORT_SCALE = 10
"""Events in the short-term category share."""
COVISIT_RECENT = 5
"""Recent events the co-visitation feature looks at (the latest weighs most)."""
_MAX_RANK = 1024.0
_RECENCY = recency_weights(COVISIT_RECENT)  # the compiled pass reads its last n weights; built once, not per request


@dataclass
class FeatureTables:
    """Per-bundle statistics the features read (all from the training part of the log).

    Attributes:
        item_category: [M] category id per item id.
        item_counts: [M] training interactions per item id.
        business: item/category funnel statistics and time-aware popularity.
        covisit: the co-visitation graph of the recall channel.
        fitted: the registered feature groups' own statistics (:func:`rank.schema.fit_feature_tables`).
    """

    item_category: np.ndarray
    item_counts: np.ndarray
    business: BusinessTables
    covisit: CoVisitation
    fitted: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class RankFeatures:
    """Model inputs as numpy arrays.

    Attributes:
        hist_items, hist_categories, hist_behaviors, hist_gaps: [B, L] recent behaviour,
            right-aligned, 0 = padding; gaps are log-time buckets to the request time.
        cand_items, cand_categories, cand_channels: [B, C] candidates, 0 = padding.
        dense: [B, C, F] float32 numeric features, named in order by :func:`rank.schema.dense_names`.
    """

    hist_items: np.ndarray
    hist_categories: np.ndarray
    hist_behaviors: np.ndarray
    hist_gaps: np.ndarray
    cand_items: np.ndarray
    cand_categories: np.ndarray
    cand_channels: np.ndarray
    dense: np.ndarray

    def take(self, rows: np.ndarray) -> "RankFeatures":
        """The features of the given rows (users or groups)."""
        return RankFeatures(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @classmethod
    def concat(cls, parts: list["RankFeatures"]) -> "RankFeatures":
        """Stack batches of features with the same history length and candidate count."""
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def arrays(self) -> dict[str, np.ndarray]:
        """Field name -> contiguous array: the ranker's inputs (int64 ids, float32 ``dense``)."""
        return {f.name: np.ascontiguousarray(getattr(self, f.name), dtype=np.float32 if f.name == "dense" else np.int64) for f in fields(self)}

    def to_torch(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(a).to(device) for name, a in self.arrays().items()}


def build_features(
    window: Window,
    now: np.ndarray,
    cand_items: np.ndarray,
    cand_scores: np.ndarray,
    cand_channels: np.ndarray,
    cand_ranks: np.ndarray,
    *,
    user_activity: np.ndarray,
    tables: FeatureTables,
    num_gap_buckets: int,
) -> RankFeatures:
    """Assemble ranking features: every registered feature group (:mod:`rank.schema`), in order.

    Args:
        window: the users' recent behaviour [B, L].
        now: [B] request times.
        cand_items, cand_scores, cand_channels: [B, C] candidates with their recall
            scores and channels (padding: item 0).
        cand_ranks: [B, C] each candidate's position in the recall-ordered list (0 = best).
        user_activity: [B] number of events in each user's whole history.
        tables: the bundle's statistics.
        num_gap_buckets: time-gap bucket count (the ranker's config).

    Returns:
        The features, ready for :meth:`RankFeatures.to_torch`.

    Raises:
        ValueError: a feature group returned an array of the wrong shape.
    """
    now = np.asarray(now, np.int64)
    real = cand_items > 0
    cand_categories = tables.item_category[np.where(cand_items < len(tables.item_category), cand_items, 0)]
    batch = FeatureBatch(window, now, cand_items, cand_scores, cand_channels, cand_categories, cand_ranks, real, np.asarray(user_activity), tables)
    popularity = tables.business.fixed_popularity(now) if groups() == _BUILTIN else None
    dense = _registered_dense(batch) if popularity is None else _builtin_dense(batch, popularity)  # [B, C, F]
    return RankFeatures(
        hist_items=window.items,
        hist_categories=window.categories,
        hist_behaviors=window.behaviors,
        hist_gaps=gap_buckets(now, window.ts, window.items > 0, num_gap_buckets),
        cand_items=cand_items,
        cand_categories=np.where(real, cand_categories, 0),
        cand_channels=cand_channels.astype(np.int64),
        dense=dense,
    )


def _registered_dense(batch: FeatureBatch) -> np.ndarray:
    """float32 [B, C, F]: every registered group's columns, in order; 0 for padding candidates."""
    b, c = batch.cand_items.shape
    blocks = []
    for group in groups():
        block = np.asarray(group.compute(batch))
        want = (b, len(group.names)) if group.per_user else (b, c, len(group.names))
        if block.shape != want:
            raise ValueError(f"feature group {', '.join(group.names)} returned shape {block.shape}, expected {want}")
        blocks.append(np.broadcast_to(block[:, None, :], (b, c, want[1])) if group.per_user else block)
    dense = np.concatenate(blocks, axis=-1).astype(np.float32)  # [B, C, F]
    dense[~batch.real] = 0.0
    return dense


def _builtin_dense(batch: FeatureBatch, popularity: np.ndarray) -> np.ndarray:
    """What :func:`_registered_dense` returns when only the built-in groups are registered, in one compiled pass.

    A request then makes one call instead of some twenty numpy calls of glue between the
    groups, each of which costs tens of microseconds when the caches are cold.

    Args:
        batch: the batch, its request times all the business tables' fixed time.
        popularity: the popularity table at that time (:meth:`BusinessTables.fixed_popularity`).
    """
    tables = batch.tables
    graph = tables.covisit.graph
    return builtin_dense(
        _kernel_inputs(batch),
        tables.item_counts,
        graph.indptr,
        graph.indices,
        graph.data,
        _RECENCY,
        popularity,
        tables.business.item,
        kernel_array(_user_columns(batch), np.float32),
        SHORT_SCALE,
        _MAX_RANK,
    )  # [B, C, F]


def _candidate_columns(batch: FeatureBatch) -> np.ndarray:
    """[B, C, len(CANDIDATE_COLUMNS)]: recall score and rank, popularity, category shares, co-visitation, what the user did with the item."""
    window, tables = batch.window, batch.tables
    covisit = tables.covisit.pair_scores(window.items[:, -COVISIT_RECENT:], batch.cand_items)  # [B, C, n]
    return candidate_columns(*_kernel_inputs(batch), tables.item_counts, covisit, recency_weights(covisit.shape[-1]), SHORT_SCALE, _MAX_RANK)  # [B, C, 11]


def _kernel_inputs(batch: FeatureBatch) -> tuple[np.ndarray, ...]:
    """What the compiled feature passes read of a batch, in their one layout (:func:`recall.lookup.kernel_array`).

    The window's items, categories, behaviours and times, the request times, then the
    candidates' items, categories, recall scores (float32) and recall ranks.
    """
    window = batch.window
    ids = (window.items, window.categories, window.behaviors, window.ts, batch.now, batch.cand_items, batch.cand_categories)
    return (*(kernel_array(a) for a in ids), kernel_array(batch.cand_scores, np.float32), kernel_array(batch.cand_ranks))


def _user_columns(batch: FeatureBatch) -> np.ndarray:
    """[B, len(USER_COLUMNS)]: overall activity, then the user's business features."""
    activity = np.log1p(np.asarray(batch.user_activity, np.float64))[:, None] / 10.0  # [B, 1]
    return np.concatenate([activity, user_business_features(batch.window, batch.now)], axis=-1)


# The built-in features, in the column order every bundle so far was trained with. While
# they are all that is registered, requests at the fixed time take _builtin_dense.
_BUILTIN = (
    register_features(CANDIDATE_COLUMNS, _candidate_columns),
    register_features(POPULARITY_COLUMNS, lambda batch: batch.tables.business.popularity(batch.cand_items, batch.now)),
    register_features(ITEM_FEATURES, lambda batch: batch.tables.business.item_features(batch.cand_items)),
    register_features(USER_COLUMNS, _user_columns, per_user=True),
)


def recall_ranks(scores: np.ndarray, list_scores: np.ndarray) -> np.ndarray:
    """Where items with recall ``scores`` would stand in a recall-ordered candidate list.

    Args:
        scores: [B, G] recall scores.
        list_scores: [B, C] the list's scores, best first (-inf for padding).

    Returns:
        int64 [B, G]: how many list entries score strictly higher.
    """
    out = np.zeros(scores.shape, np.int64)
    for i, (row, s) in enumerate(zip(list_scores, scores)):
        out[i] = np.searchsorted(-row, -s, side="left")  # -row ascends; padding (-inf) sorts last
    return out
