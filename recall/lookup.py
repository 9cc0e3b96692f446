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


def kernel_array(a: np.ndarray, dtype: type = np.int64) -> np.ndarray:
    """``a`` as a C-contiguous, writable array of ``dtype``: the one layout the compiled lookups
    here and in :mod:`rank.kernels` see for per-request arrays.

    numba compiles a function once per argument type, and a read-only view (``np.broadcast_to``)
    or a strided slice is another type: without this, the first request to pass one would
    stall while numba loads or compiles a second copy.
    """
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


@numba.njit(cache=True, nogil=True)
def _find(keys: np.ndarray, lo: int, hi: int, key: int) -> int:
    """Where ``key`` is in the ascending ``keys[lo:hi]`` (binary search), or -1."""
    end = hi
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < end and keys[lo] == key else -1


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
                at = _find(indices, lo, hi, dst)
                if at >= 0:
                    out[i, j, k] = data[at]
    return out


@numba.njit(cache=True, nogil=True)
def _may_get(row: int, item: int, excluded: np.ndarray, width: int, item_category: np.ndarray, category: int) -> bool:
    """Whether user ``row`` may get ``item``: of ``category`` (-1: any) and not among the sorted ``excluded`` keys ``row * width + item``."""
    return (category < 0 or item_category[item] == category) and _find(excluded, 0, len(excluded), row * width + item) < 0


@numba.njit(cache=True, nogil=True)
def allowed_ids(ids: np.ndarray, excluded: np.ndarray, width: int, item_category: np.ndarray, category: int, k: int) -> np.ndarray:
    """The first ``k`` ids of each row that are neither padding nor excluded, and of ``category``, order kept.

    Args:
        ids: [B, K] item ids, best first; 0 (and any id < 0) is padding.
        excluded: sorted int64 keys ``row * width + item`` of the excluded (row, item) pairs.
        width: the key stride (the catalogue size).
        item_category: [M] category id per item id.
        category: keep only this category id; -1 keeps every category.
        k: ids kept per row.

    Returns:
        int64 [B, min(K, k)], 0 = padding (after the kept ids of the row).
    """
    b, width_in = ids.shape
    out = np.zeros((b, min(width_in, k)), np.int64)
    for i in range(b):
        kept = 0
        for j in range(width_in):
            if kept == out.shape[1]:
                break
            item = ids[i, j]
            if item <= 0 or not _may_get(i, item, excluded, width, item_category, category):
                continue
            out[i, kept] = item
            kept += 1
    return out


@numba.njit(cache=True, nogil=True)
def graph_top(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    recent: np.ndarray,
    recency: np.ndarray,
    excluded: np.ndarray,
    width: int,
    item_category: np.ndarray,
    category: int,
    k: int,
) -> np.ndarray:
    """Per row, the ``k`` items with the largest weighted graph weights from the row's recent items.

    An item's score is the sum over the recent items ``r`` (position ``p``) of
    ``recency[p] * graph[r, item]`` in float64, added in the order of ``p`` and of the
    row's columns, then rounded to float32; ties go to the smaller id.

    Args:
        indptr, indices, data: the graph [R, M] in CSR form.
        recent: [B, n] item ids, most recent last; 0 and ids outside [1, R) link nothing.
        recency: float64 [n] the weight of each recent position.
        excluded, width, item_category, category: as in :func:`allowed_ids`.
        k: items kept per row.

    Returns:
        int64 [B, k], best first, 0 = padding.
    """
    b, n = recent.shape
    rows = len(indptr) - 1
    out = np.zeros((b, k), np.int64)
    for i in range(b):
        size = 0
        for p in range(n):
            src = recent[i, p]
            if 0 < src < rows:
                size += indptr[src + 1] - indptr[src]
        if size == 0:
            continue
        cols = np.empty(size, np.int64)
        weights = np.empty(size, np.float64)
        at = 0
        for p in range(n):
            src = recent[i, p]
            if not 0 < src < rows:
                continue
            scale = recency[p]
            for e in range(indptr[src], indptr[src + 1]):
                cols[at] = indices[e]
                weights[at] = scale * np.float64(data[e])
                at += 1
        order = np.argsort(cols, kind="mergesort")  # stable: equal items add up in the order above
        items = np.empty(size, np.int64)
        scores = np.empty(size, np.float32)
        unique = 0
        e = 0
        while e < size:
            item = cols[order[e]]
            total = 0.0
            while e < size and cols[order[e]] == item:
                total += weights[order[e]]
                e += 1
            if _may_get(i, item, excluded, width, item_category, category):
                items[unique] = item
                scores[unique] = np.float32(total)
                unique += 1
        best = np.argsort(-scores[:unique], kind="mergesort")  # stable over ascending ids
        for j in range(min(k, unique)):
            out[i, j] = items[best[j]]
    return out


@numba.njit(cache=True, nogil=True)
def merge_rows(ids: np.ndarray, tags: np.ndarray, user_vecs: np.ndarray, item_vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's distinct ids, tagged by their first occurrence and ordered by their inner product with the row's user vector.

    One compiled pass for what would be a dozen numpy calls per request (de-duplicate,
    gather both vectors, score, sort, lay out), each of which costs tens of microseconds
    when a request finds the caches cold.

    Args:
        ids: [B, T] ids, 0 (or below) = padding; an id's first occurrence in a row keeps its tag.
        tags: int8 [B, T] a tag per entry (the recall channel that found it).
        user_vecs: float32 [B, d].
        item_vecs: float32 [M, d].

    Returns:
        (ids int64, scores float32, tags int8), each [B, W] with W the most distinct ids
        of a row; each row best score first, ties by ascending id; padding: id 0, score
        -inf, tag 0.
    """
    b, t = ids.shape
    found = np.zeros((b, t), np.int64)  # per row: its distinct ids, ascending
    found_tags = np.zeros((b, t), np.int8)
    counts = np.zeros(b, np.int64)
    for i in range(b):
        order = np.argsort(ids[i], kind="mergesort")  # stable: an id's first occurrence leads its run
        previous = 0
        for j in order:
            item = ids[i, j]
            if item > 0 and item != previous:
                found[i, counts[i]], found_tags[i, counts[i]] = item, tags[i, j]
                counts[i] += 1
            previous = item
    width = counts.max() if b else 0
    out_ids = np.zeros((b, width), np.int64)
    out_scores = np.full((b, width), -np.inf, np.float32)
    out_tags = np.zeros((b, width), np.int8)
    for i in range(b):
        n = counts[i]
        scores = np.empty(n, np.float32)
        for e in range(n):
            scores[e] = np.dot(user_vecs[i], item_vecs[found[i, e]])
        best = np.argsort(-scores, kind="mergesort")
        for slot in range(n):
            e = best[slot]
            out_ids[i, slot], out_scores[i, slot], out_tags[i, slot] = found[i, e], scores[e], found_tags[i, e]
    return out_ids, out_scores, out_tags


@numba.njit(cache=True, nogil=True)
def best_first_columns(
    items: np.ndarray, scores: np.ndarray, heads: np.ndarray, recall_scores: np.ndarray, channels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's candidates by descending final score, padding last, with their columns laid out in that order.

    One compiled pass for the sort and the gathers that would otherwise be a dozen numpy
    calls per request.

    Args:
        items: [B, C] ids, 0 = padding.
        scores: [B, C] final scores.
        heads: [B, C, H] per-head scores.
        recall_scores: float32 [B, C].
        channels: int8 [B, C].

    Returns:
        (order int64 [B, C]: the column in each slot, stable among equal scores; then in
        that order: items, recall scores, channels, and float32 [B, C, 1 + H] the final
        score followed by the heads', 0 for padding).
    """
    b, c = items.shape
    h = heads.shape[2]
    order = np.empty((b, c), np.int64)
    out_items = np.zeros((b, c), np.int64)
    out_recall = np.empty((b, c), np.float32)
    out_channels = np.zeros((b, c), np.int8)
    out_scores = np.zeros((b, c, 1 + h), np.float32)
    key = np.empty(c, np.float64)
    for i in range(b):
        for j in range(c):
            key[j] = -scores[i, j] if items[i, j] > 0 else np.inf
        columns = np.argsort(key, kind="mergesort")
        for slot in range(c):
            j = columns[slot]
            order[i, slot] = j
            out_items[i, slot], out_recall[i, slot], out_channels[i, slot] = items[i, j], recall_scores[i, j], channels[i, j]
            if items[i, j] > 0:
                out_scores[i, slot, 0] = scores[i, j]
                for k in range(h):
                    out_scores[i, slot, 1 + k] = heads[i, j, k]
    return order, out_items, out_recall, out_channels, out_scores
