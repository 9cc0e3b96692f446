"""Sorted-array lookups and per-row top-k selection over sparse entries, shared by the recall channels and the ranking features."""

import numba
import numpy as np
import scipy.sparse as sp


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


def descending_key(vals: np.ndarray) -> np.ndarray:
    """int64 keys in [0, 2**32) that sort float32 ``vals`` largest first (NaN aside)."""
    bits = np.asarray(vals, np.float32).view(np.int32).astype(np.int64)
    ascending = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed ints: negative floats' bits reversed
    return (1 << 31) - 1 - ascending


def top_entries(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, num_rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest ``k`` of the entries ``(rows[i], cols[i], vals[i])`` in each row, best first.

    Args:
        rows, cols, vals: [E] entries, at most one per (row, col); rows in [0, 2**31).
        num_rows: R.
        k: entries kept per row.

    Returns:
        (cols [R, k] int64 padded with 0, values [R, k] float32 padded with -inf).
    """
    rows, cols, vals = np.asarray(rows, np.int64), np.asarray(cols, np.int64), np.asarray(vals, np.float32)
    order = np.argsort((rows << 32) | descending_key(vals), kind="stable")  # by row, then best first; one key sorts faster than lexsort's two
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.searchsorted(rows, np.arange(num_rows))
    rank = np.arange(len(rows)) - starts[rows]
    keep = rank < k
    out_cols = np.zeros((num_rows, k), dtype=np.int64)
    out_vals = np.full((num_rows, k), -np.inf, dtype=np.float32)
    out_cols[rows[keep], rank[keep]] = cols[keep]
    out_vals[rows[keep], rank[keep]] = vals[keep]
    return out_cols, out_vals


@numba.njit(cache=True, nogil=True)
def csr_pair_weights(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, recent: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Weights of the edges from each recent item to each item in a CSR graph with sorted columns.

    Args:
        indptr, indices, data: the graph [R, K] (columns ascending within each row).
        recent: [B, n] source item ids, 0 = padding; ids outside [1, R) link nothing.
        items: [B, C] target item ids, 0 = padding; ids outside [1, K) are linked by nothing.

    Returns:
        float32 [B, C, n]; 0 where there is no edge.
    """
    b, n = recent.shape
    c = items.shape[1]
    rows = len(indptr) - 1
    out = np.zeros((b, c, n), np.float32)
    for i in range(b):
        for k in range(n):
            src = recent[i, k]
            if src <= 0 or src >= rows:
                continue
            lo, hi = indptr[src], indptr[src + 1]
            if lo == hi:
                continue
            for j in range(c):
                dst = items[i, j]
                if dst <= 0:
                    continue
                a, z = lo, hi  # binary search for dst among the row's ascending columns
                while a < z:
                    mid = (a + z) >> 1
                    if indices[mid] < dst:
                        a = mid + 1
                    else:
                        z = mid
                if a < hi and indices[a] == dst:
                    out[i, j, k] = data[a]
    return out
