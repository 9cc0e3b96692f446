"""Cheap recall channels beside the two-tower: item-to-item co-visitation and popularity.

They cover what an embedding misses: a user with one or two events (co-visitation
of their latest items) and users or items the model knows nothing about (popularity).
Both are registered recall channels (:mod:`recall.plugin`), in this order.
"""

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from funnel.events.dataset import Dataset
from funnel.events.sequences import Sequences
from funnel.recall.lookup import csr_pair_weights, graph_top, kernel_array, top_entries
from funnel.recall.plugin import ChannelQuery, register_channel

SHARD_ENTRIES = 64_000_000
"""Co-visitation pair entries counted at a time (:meth:`CoVisitation.count_pairs`): about 1.3 GB while sorted."""
PAIR_CHUNK = 1 << 23
"""Positions whose pairs are gathered at a time."""


@register_channel
@dataclass
class CoVisitation:
    """Item → co-visited items with weights, truncated to the top ``neighbours`` per item.

    As a channel: the items most co-visited with each user's ``recent`` latest events.
    Its graph is also a ranking feature (:mod:`rank.features`).

    Attributes:
        graph: [M, M] sparse; row i holds the items most often visited near item i.
    """

    name: ClassVar[str] = "covisit"
    default_count: ClassVar[int] = 50
    graph: sp.csr_matrix

    def __post_init__(self):
        self.graph.sort_indices()  # pair_scores binary-searches each row's columns; candidates adds up in column order

    @classmethod
    def fit(cls, data: Dataset, mask: np.ndarray) -> "CoVisitation":
        """The channel fitted on ``data.seqs`` where ``mask`` is set (:meth:`count_pairs` with the defaults)."""
        return cls.count_pairs(data.seqs, mask, data.items.size)

    def candidates(self, query: ChannelQuery, k: int) -> np.ndarray:
        """The ``k`` items each user may get that score highest from the user's ``query.recent`` latest events.

        An item scores the sum of its graph weights from those events, the latest
        weighing most (halving per step back, :func:`recency_weights`); ties go to the
        smaller id. One compiled pass per user (:func:`recall.lookup.graph_top`).

        Returns:
            int64 [B, k], best first, 0 = padding.
        """
        g = self.graph
        recent = kernel_array(query.window.items[:, -query.recent :])
        return graph_top(g.indptr, g.indices, g.data, recent, recency_weights(recent.shape[1]), query.exclude.keys, query.exclude.width, query.item_category, query.category_code, k)

    def save(self, directory: str) -> None:
        sp.save_npz(os.path.join(directory, f"{self.name}.npz"), self.graph)

    @classmethod
    def load(cls, directory: str) -> "CoVisitation":
        return cls(sp.load_npz(os.path.join(directory, f"{cls.name}.npz")).tocsr())

    @classmethod
    def count_pairs(
        cls, seqs: Sequences, mask: np.ndarray, num_items: int, *, window: int = 3, neighbours: int = 50, shard_entries: int = SHARD_ENTRIES
    ) -> "CoVisitation":
        """Count item pairs that occur within ``window`` events of each other in a user's sequence.

        Memory stays bounded at any log size: the graph is counted in shards of source
        items (item id modulo the shard count), each holding about ``shard_entries`` pair
        entries, and only each item's top ``neighbours`` survive a shard.

        Args:
            seqs: per-user sequences.
            mask: bool [N]; only these positions count (the training part).
            num_items: item id space size.
            window: how many following events pair with each event; nearer pairs weigh more.
            neighbours: neighbours kept per item.
            shard_entries: pair entries counted at a time (about 20 bytes each while counted).
        """
        items = seqs.items
        ends = np.repeat(seqs.offsets[1:], seqs.lengths)  # [N] where each position's user ends
        pairs = [_pair_starts(items, ends, mask, d) for d in range(1, window + 1)]  # bool [N - d] per distance d
        del ends
        # Damp very popular neighbours so the channel is not a second popularity list: every
        # entry is divided by the square root of its column's total weight.
        weight = np.zeros(num_items)
        for d, first, then in _pair_chunks(items, pairs):
            weight += np.bincount(then, minlength=num_items) / d + np.bincount(first, minlength=num_items) * (0.5 / d)
        damp = (1.0 / np.sqrt(np.maximum(weight, 1.0))).astype(np.float32)
        shards = max(1, -(-2 * int(sum(ok.sum() for ok in pairs)) // shard_entries))
        rows_per_shard = -(-num_items // shards)
        kept = []  # per shard: neighbours per local row, their columns and weights (row-major)
        for s in range(shards):
            keys, w = _shard_pairs(items, pairs, s, shards, num_items)
            r, c = keys // num_items, keys % num_items
            del keys
            top_c, top_v = top_entries(r // shards, c, w * damp[c], rows_per_shard, neighbours)
            keep = np.isfinite(top_v)
            kept.append((keep.sum(1), top_c[keep].astype(np.int32), top_v[keep]))
        return cls(_csr_from_shards(kept, shards, num_items))

    def pair_scores(self, recent: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Graph weights from each recent item to each given item (the ranker's co-visitation features).

        One binary search per (recent item, item) pair within the recent item's graph row
        (compiled, :func:`recall.lookup.csr_pair_weights`), so nothing is gathered per call.
        Weighted by :func:`recency_weights` and summed over the last axis, they are the
        items' scores in :meth:`candidates`.

        Args:
            recent: [B, n] item ids, most recent last, 0 = padding.
            items: [B, C] item ids to score, 0 = padding.

        Returns:
            float32 [B, C, n]; 0 for padding and where a recent item does not link to the item.
        """
        g = self.graph
        return csr_pair_weights(g.indptr, g.indices, g.data, kernel_array(recent), kernel_array(items))


def _pair_starts(items: np.ndarray, ends: np.ndarray, mask: np.ndarray, d: int) -> np.ndarray:
    """bool [N - d]: whether positions ``a`` and ``a + d`` form a co-visitation pair (same user, both counted, different items).

    Args:
        items, ends, mask: [N] item ids, the end of each position's user, counted positions.
        d: the distance.
    """
    return (np.arange(d, len(items)) < ends[:-d]) & mask[:-d] & mask[d:] & (items[:-d] != items[d:])


def _csr_from_shards(kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]], shards: int, num_items: int) -> sp.csr_matrix:
    """The [M, M] graph from each shard's kept entries, written straight into CSR arrays (no COO copy).

    Args:
        kept: per shard ``s``, for its local rows ``r`` (global row ``r * shards + s``): the
            entry count per row, and the entries' columns and weights in row-major order.
        shards: the shard count.
        num_items: M.
    """
    counts = np.zeros(num_items, np.int64)
    for s, (n, _, _) in enumerate(kept):
        counts[s::shards] = n[: len(counts[s::shards])]
    indptr = np.zeros(num_items + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices, data = np.empty(indptr[-1], np.int32), np.empty(indptr[-1], np.float32)
    for s, (n, cols, vals) in enumerate(kept):
        starts = np.zeros(len(n), np.int64)
        starts[: len(counts[s::shards])] = indptr[:-1][s::shards]
        first = np.cumsum(n) - n  # each local row's first entry in ``cols``
        dest = np.repeat(starts - first, n) + np.arange(len(cols))
        indices[dest], data[dest] = cols, vals
    return sp.csr_matrix((data, indices, indptr), shape=(num_items, num_items))


def _shard_pairs(items: np.ndarray, pairs: list[np.ndarray], shard: int, shards: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The summed pair weights whose source item falls in ``shard`` (item id modulo ``shards``).

    A pair ``d`` events apart weighs ``1/d`` forward and ``0.5/d`` backward ("viewed
    together" is symmetric; the forward pair weighs more). Each entry is one int64,
    the pair and its weight class, so one in-place sort groups the pairs.

    Returns:
        (keys int64 [E] ``source * num_items + target``, sorted and unique; weights float32 [E]).
    """
    classes = 2 * len(pairs)
    class_weight = np.array([w / d for d in range(1, len(pairs) + 1) for w in (1.0, 0.5)], np.float32)
    entries = []
    for d, first, then in _pair_chunks(items, pairs):
        for src, dst, c in ((first, then, 2 * (d - 1)), (then, first, 2 * (d - 1) + 1)):  # the weight classes of class_weight
            pick = src % shards == shard
            entries.append((src[pick] * num_items + dst[pick]) * classes + c)
    entries = np.concatenate(entries) if entries else np.zeros(0, np.int64)
    entries.sort()
    keys = entries // classes
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    weights = class_weight[entries % classes]
    return keys[starts], (np.add.reduceat(weights, starts) if len(keys) else weights)


def _pair_chunks(items: np.ndarray, pairs: list[np.ndarray]):
    """Yield ``(d, first items, then items)`` of the pairs ``d`` apart, a chunk of positions at a time (bounded memory)."""
    for d, ok in enumerate(pairs, 1):
        for lo in range(0, len(ok), PAIR_CHUNK):
            a = np.flatnonzero(ok[lo : lo + PAIR_CHUNK]) + lo
            yield d, items[a], items[a + d]


def recency_weights(n: int) -> np.ndarray:
    """Weights of ``n`` recent items, oldest first: the latest weighs 1, halving per step back."""
    return 0.5 ** np.arange(n)[::-1]


@register_channel
@dataclass
class Popularity:
    """Items ranked by training interactions, most popular first.

    As a channel: the most popular items each user may get. Its counts also say which
    items training saw (the recommendable set) and are a ranking feature.

    Attributes:
        ranked: int64 item ids, most popular first.
        counts: int64 [M] interactions per item id.
    """

    name: ClassVar[str] = "popular"
    default_count: ClassVar[int] = 20
    FILE: ClassVar[str] = "popularity.npy"
    """Its file in the bundle's ``recall`` directory (the counts)."""
    ranked: np.ndarray
    counts: np.ndarray

    @classmethod
    def fit(cls, data: Dataset, mask: np.ndarray) -> "Popularity":
        """The channel fitted on ``data.seqs`` where ``mask`` is set (:meth:`count_items`)."""
        return cls.count_items(data.seqs, mask, data.items.size)

    @classmethod
    def count_items(cls, seqs: Sequences, mask: np.ndarray, num_items: int) -> "Popularity":
        """Interactions per item id over the positions of ``seqs`` where ``mask`` is set."""
        return cls.from_counts(np.bincount(seqs.items[mask], minlength=num_items).astype(np.int64))

    def candidates(self, query: ChannelQuery, k: int) -> np.ndarray:
        """The ``k`` most popular items each user may get (int64 [B, k], 0 = padding)."""
        ranked = self.ranked
        if query.category is not None:
            ranked = ranked[query.item_category[ranked] == query.category]
        head = np.broadcast_to(ranked[: k + query.exclude.most_per_row], (len(query.user_vecs), min(len(ranked), k + query.exclude.most_per_row)))
        return query.allowed(head, k)

    def save(self, directory: str) -> None:
        np.save(os.path.join(directory, self.FILE), self.counts)

    @classmethod
    def load(cls, directory: str) -> "Popularity":
        return cls.from_counts(np.load(os.path.join(directory, cls.FILE)))

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> "Popularity":
        """Rank item ids by ``counts`` (id 0, the padding id, is never ranked)."""
        counts = counts.copy()
        counts[0] = 0
        ranked = np.argsort(-counts, kind="stable")
        return cls(ranked[counts[ranked] > 0], counts)
