"""Cheap recall channels beside the two-tower: item-to-item co-visitation and popularity.

They cover what an embedding misses: a user with one or two events (co-visitation
of their latest items) and users or items the model knows nothing about (popularity).
"""

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from events.sequences import Sequences


def top_per_row(m: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest ``k`` entries of each sparse row, best first.

    Returns:
        (cols [R, k] int64 padded with 0, values [R, k] float32 padded with -inf).
    """
    m = m.tocoo()
    return top_entries(m.row, m.col, m.data, m.shape[0], k)


def sorted_lookup(keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each query would sit in the sorted, non-empty ``keys``, and whether it is there.

    Returns:
        (positions, clipped to ``len(keys) - 1``; bool found), both shaped like ``query``.
    """
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return at, keys[at] == query


def top_entries(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, num_rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest ``k`` of the entries ``(rows[i], cols[i], vals[i])`` in each row, best first.

    Args:
        rows, cols, vals: [E] entries, at most one per (row, col).
        num_rows: R.
        k: entries kept per row.

    Returns:
        (cols [R, k] int64 padded with 0, values [R, k] float32 padded with -inf).
    """
    rows, cols, vals = np.asarray(rows, np.int64), np.asarray(cols, np.int64), np.asarray(vals, np.float32)
    order = np.lexsort((-vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.searchsorted(rows, np.arange(num_rows))
    rank = np.arange(len(rows)) - starts[rows]
    keep = rank < k
    out_cols = np.zeros((num_rows, k), dtype=np.int64)
    out_vals = np.full((num_rows, k), -np.inf, dtype=np.float32)
    out_cols[rows[keep], rank[keep]] = cols[keep]
    out_vals[rows[keep], rank[keep]] = vals[keep]
    return out_cols, out_vals


@dataclass
class CoVisitation:
    """Item → co-visited items with weights, truncated to the top ``neighbours`` per item.

    Attributes:
        graph: [M, M] sparse; row i holds the items most often visited near item i.
    """

    graph: sp.csr_matrix
    _keys: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.graph.sort_indices()
        g = self.graph
        # One sorted key per edge (row-major, ascending columns), so pair_scores looks
        # edges up with one binary search and no per-call gathering of rows.
        self._keys = np.repeat(np.arange(g.shape[0], dtype=np.int64), np.diff(g.indptr)) * g.shape[1] + g.indices

    @classmethod
    def fit(cls, seqs: Sequences, mask: np.ndarray, num_items: int, *, window: int = 3, neighbours: int = 50) -> "CoVisitation":
        """Count item pairs that occur within ``window`` events of each other in a user's sequence.

        Args:
            seqs: per-user sequences.
            mask: bool [N]; only these positions count (the training part).
            num_items: item id space size.
            window: how many following events pair with each event; nearer pairs weigh more.
            neighbours: neighbours kept per item.
        """
        owner = seqs.user_positions()
        rows, cols, vals = [], [], []
        for d in range(1, window + 1):
            a = np.arange(len(seqs) - d)
            ok = (owner[a] == owner[a + d]) & mask[a] & mask[a + d] & (seqs.items[a] != seqs.items[a + d])
            a = a[ok]
            # Both directions: "viewed together" is symmetric; the forward pair weighs more.
            rows += [seqs.items[a], seqs.items[a + d]]
            cols += [seqs.items[a + d], seqs.items[a]]
            vals += [np.full(len(a), 1.0 / d, np.float32), np.full(len(a), 0.5 / d, np.float32)]
        graph = sp.csr_matrix(
            (np.concatenate(vals) if vals else [], (np.concatenate(rows) if rows else [], np.concatenate(cols) if cols else [])),
            shape=(num_items, num_items),
            dtype=np.float32,
        )
        # Damp very popular neighbours so the channel is not a second popularity list.
        pop = np.asarray(graph.sum(axis=0)).ravel()
        graph = graph @ sp.diags(1.0 / np.sqrt(np.maximum(pop, 1.0))).astype(np.float32)
        cols_k, vals_k = top_per_row(graph.tocsr(), neighbours)
        keep = np.isfinite(vals_k)
        r = np.repeat(np.arange(num_items), keep.sum(1))
        return cls(sp.csr_matrix((vals_k[keep], (r, cols_k[keep])), shape=(num_items, num_items), dtype=np.float32))

    def scores(self, recent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Co-visitation scores for each row of recent item ids, as the non-zero entries of a [B, M] matrix.

        Only the graph rows of the recent items are read (no sparse product: at a few
        users per call its set-up would cost more than the work).

        Args:
            recent: [B, n] item ids, most recent last, 0 = padding; ids beyond the graph link nothing.

        Returns:
            (rows, items, scores), each [E], one entry per (row, item) pair, sorted by row
            then item; the latest recent item weighs most (halving per step back).
        """
        g = self.graph
        width = g.shape[1]
        user, pos = np.nonzero((recent > 0) & (recent < g.shape[0]))  # [P]
        src = recent[user, pos]
        starts, lens = g.indptr[src], g.indptr[src + 1] - g.indptr[src]
        entries = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())  # positions in g.indices, [E']
        keys = np.repeat(user.astype(np.int64), lens) * width + g.indices[entries]
        weights = np.repeat(recency_weights(recent.shape[1])[pos], lens) * g.data[entries]
        unique, inverse = np.unique(keys, return_inverse=True)
        return unique // width, unique % width, np.bincount(inverse, weights=weights, minlength=len(unique)).astype(np.float32)

    def pair_scores(self, recent: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Graph weights from each recent item to each given item (the ranker's co-visitation features).

        One binary search per (recent item, item) pair in the graph's sorted edge keys, so
        nothing is gathered per call. Weighted by :func:`recency_weights` and summed over
        the last axis, they are the entries of :meth:`scores` at ``items``.

        Args:
            recent: [B, n] item ids, most recent last, 0 = padding.
            items: [B, C] item ids to score, 0 = padding.

        Returns:
            float32 [B, C, n]; 0 for padding and where a recent item does not link to the item.
        """
        g, keys = self.graph, self._keys
        if not len(keys):
            return np.zeros((*items.shape, recent.shape[1]), np.float32)
        ok = ((recent > 0) & (recent < g.shape[0]))[:, None, :] & ((items > 0) & (items < g.shape[1]))[:, :, None]  # [B, C, n]
        query = np.where(ok, recent[:, None, :] * np.int64(g.shape[1]) + items[:, :, None], -1)  # [B, C, n]; -1 matches no edge
        at, found = sorted_lookup(keys, query)
        return np.where(found, g.data[at], 0.0).astype(np.float32)


def recency_weights(n: int) -> np.ndarray:
    """Weights of ``n`` recent items, oldest first: the latest weighs 1, halving per step back."""
    return 0.5 ** np.arange(n)[::-1]


@dataclass
class Popularity:
    """Items ranked by training interactions, most popular first.

    Attributes:
        ranked: int64 item ids, most popular first.
        counts: int64 [M] interactions per item id.
    """

    ranked: np.ndarray
    counts: np.ndarray

    @classmethod
    def fit(cls, seqs: Sequences, mask: np.ndarray, num_items: int) -> "Popularity":
        return cls.from_counts(np.bincount(seqs.items[mask], minlength=num_items).astype(np.int64))

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> "Popularity":
        """Rank item ids by ``counts`` (id 0, the padding id, is never ranked)."""
        counts = counts.copy()
        counts[0] = 0
        ranked = np.argsort(-counts, kind="stable")
        return cls(ranked[counts[ranked] > 0], counts)
