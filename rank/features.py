"""Ranking features for (user, candidate) pairs, one function for training, evaluation and serving.

Using the same function everywhere is what keeps offline and online features equal.
"""

from dataclasses import dataclass, fields

import numpy as np
import torch

from events.sequences import Window
from events.timegap import gap_buckets

NUM_DENSE = 4
"""recall score, log item popularity, share of the history in the candidate's category, log user activity."""


@dataclass
class RankFeatures:
    """Model inputs as numpy arrays.

    Attributes:
        hist_items, hist_categories, hist_behaviors, hist_gaps: [B, L] recent behaviour,
            right-aligned, 0 = padding; gaps are log-time buckets to the request time.
        cand_items, cand_categories, cand_channels: [B, C] candidates, 0 = padding.
        dense: [B, C, NUM_DENSE] float32 numeric features.
    """

    hist_items: np.ndarray
    hist_categories: np.ndarray
    hist_behaviors: np.ndarray
    hist_gaps: np.ndarray
    cand_items: np.ndarray
    cand_categories: np.ndarray
    cand_channels: np.ndarray
    dense: np.ndarray

    def to_torch(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {f.name: torch.from_numpy(np.ascontiguousarray(getattr(self, f.name))).to(device) for f in fields(self)}


def build_features(
    window: Window,
    now: np.ndarray,
    cand_items: np.ndarray,
    cand_scores: np.ndarray,
    cand_channels: np.ndarray,
    *,
    item_category: np.ndarray,
    item_counts: np.ndarray,
    user_activity: np.ndarray,
    num_gap_buckets: int,
) -> RankFeatures:
    """Assemble ranking features.

    Args:
        window: the users' recent behaviour [B, L].
        now: [B] request times.
        cand_items, cand_scores, cand_channels: [B, C] candidates with their recall
            scores and channels (padding: item 0).
        item_category: [M] category id per item id.
        item_counts: [M] training interactions per item id.
        user_activity: [B] number of events in each user's whole history.
        num_gap_buckets: time-gap bucket count (the ranker's config).

    Returns:
        The features, ready for :meth:`RankFeatures.to_torch`.
    """
    valid = window.items > 0
    cand_categories = item_category[cand_items]
    same = (window.categories[:, None, :] == cand_categories[:, :, None]) & valid[:, None, :]  # [B, C, L]
    share = same.sum(-1) / np.maximum(valid.sum(-1), 1)[:, None]
    scores = np.where(cand_items > 0, cand_scores, 0.0)
    dense = np.stack(
        [
            scores,
            np.log1p(item_counts[cand_items]) / 10.0,
            share,
            np.broadcast_to(np.log1p(user_activity)[:, None] / 10.0, cand_items.shape),
        ],
        axis=-1,
    ).astype(np.float32)
    return RankFeatures(
        hist_items=window.items,
        hist_categories=window.categories,
        hist_behaviors=window.behaviors,
        hist_gaps=gap_buckets(now, window.ts, valid, num_gap_buckets),
        cand_items=cand_items,
        cand_categories=cand_categories,
        cand_channels=cand_channels.astype(np.int64),
        dense=dense,
    )
