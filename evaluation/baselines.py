"""Non-learned full-ranking baselines (global popularity and cosine ItemKNN) over user × item CSR matrices.

Both return [len(users), k] item ids, best first, never an item from the user's own
history, and -1 where fewer than ``k`` items qualify.
"""

import numpy as np
import scipy.sparse as sp

# Users handled at a time by popularity; its memory is this × (k + longest history) booleans.
_POPULARITY_BLOCK = 4096
# Most dense scores ItemKNN holds at a time (1 GB of float32).
_SCORE_FLOATS = 1 << 28


def _check_inputs(history: sp.csr_matrix, train: sp.csr_matrix, k: int) -> None:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if history.shape[1] != train.shape[1]:
        raise ValueError(f"history has {history.shape[1]} item columns but train has {train.shape[1]}")


def _binary(m: sp.spmatrix, dtype: type = np.float32) -> sp.csr_matrix:
    """Copy of ``m`` as CSR with every stored non-zero set to 1 (explicit zeros dropped)."""
    out = sp.csr_matrix(m, dtype=dtype, copy=True)
    out.eliminate_zeros()
    out.data[:] = 1
    return out


def topk_excluding(scores: np.ndarray, exclude_csr_rows: sp.csr_matrix, k: int) -> np.ndarray:
    """Row-wise top-k of dense scores, skipping excluded and -inf entries.

    Args:
        scores: float [B, M]; used as scratch space (masked and negated in place, which
            saves a second B × M buffer), so its contents are undefined afterwards.
        exclude_csr_rows: [B, M] sparse; stored non-zero entries are never returned.
        k: results per row.

    Returns:
        int64 [B, k] column ids ordered by descending score, equal scores by ascending id
        (which of several items tied at the k-th score make the cut is unspecified); -1
        where a row has fewer than ``k`` finite, non-excluded scores.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    n_rows, n_cols = scores.shape
    coo = sp.coo_matrix(exclude_csr_rows)
    hit = coo.data != 0
    scores[coo.row[hit], coo.col[hit]] = -np.inf
    width = min(k, n_cols)
    out = np.full((n_rows, k), -1, dtype=np.int64)
    if width == 0 or n_rows == 0:
        return out
    # Selecting the smallest of the negated scores: introselect is several times slower
    # picking the largest when many entries tie at the bottom (masked -inf, zero scores).
    neg = np.negative(scores, out=scores)
    part = np.argpartition(neg, width - 1, axis=1)[:, :width]
    vals = np.take_along_axis(neg, part, axis=1)
    # lexsort keys run last-primary: ascending negated score first, then ascending id among ties.
    order = np.lexsort((part, vals), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    out[:, :width] = np.where(np.isposinf(vals), -1, ids)
    return out


def popularity_topk(history: sp.csr_matrix, train: sp.csr_matrix, k: int, users: np.ndarray) -> np.ndarray:
    """Most-interacted items in ``train``, minus each user's own history.

    Args:
        history: [U, M] rows per user; a user's stored non-zero columns are masked.
        train: [*, M] interaction counts (or 1s); an item's popularity is its column sum.
            Items with a zero sum are never recommended.
        k: results per user.
        users: row ids into ``history``.

    Returns:
        int64 [len(users), k] item ids, most popular first (ties by ascending id), -1 padded.
    """
    _check_inputs(history, train, k)
    counts = np.asarray(train.sum(axis=0), dtype=np.float64).ravel()
    ranked = np.argsort(-counts, kind="stable")
    ranked = ranked[: np.count_nonzero(counts > 0)]
    users = np.asarray(users, dtype=np.int64)
    rows = _binary(history[users], np.int8)
    out = np.full((len(users), k), -1, dtype=np.int64)
    for lo in range(0, len(users), _POPULARITY_BLOCK):
        out[lo : lo + _POPULARITY_BLOCK] = _first_unseen(ranked, rows[lo : lo + _POPULARITY_BLOCK], k)
    return out


def _first_unseen(ranked: np.ndarray, seen: sp.csr_matrix, k: int) -> np.ndarray:
    """For each row of ``seen``, the first ``k`` items of ``ranked`` it does not hold, -1 padded.

    Only the first k + (longest row) ranked items can be needed, so the dense work is
    bounded by that depth rather than by the catalogue size.
    """
    longest = int(np.diff(seen.indptr).max(initial=0))
    cand = ranked[: k + longest]
    depth = len(cand)
    slot = np.full(seen.shape[1], -1, dtype=np.int64)
    slot[cand] = np.arange(depth)
    coo = seen.tocoo()
    at = slot[coo.col]
    mask = np.zeros((seen.shape[0], depth), dtype=bool)
    mask[coo.row[at >= 0], at[at >= 0]] = True
    width = min(k, depth)
    # Stable sort on the mask moves unseen candidates first, keeping their popularity order.
    pick = np.argsort(mask, axis=1, kind="stable")[:, :width]
    out = np.full((seen.shape[0], k), -1, dtype=np.int64)
    out[:, :width] = np.where(np.take_along_axis(mask, pick, axis=1), -1, cand[pick])
    return out


def itemknn_similarity(train: sp.csr_matrix, *, neighbours: int = 100, shrink: float = 0.0, batch: int = 1024) -> sp.csr_matrix:
    """Truncated item-item cosine similarity of a binarised interaction matrix.

    sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i| |U_j|) + shrink), where U_i is the set of users
    who touched item i. The diagonal is zero and column j keeps only its ``neighbours``
    largest entries (ties by ascending item id).

    Args:
        train: [U, M] interactions; any stored non-zero counts as one.
        neighbours: entries kept per item column.
        shrink: added to the denominator to damp similarities built on few co-occurrences.
        batch: items whose co-occurrence rows are built at a time; memory is bounded by
            the non-zeros of a batch × M block, never a dense M × M matrix.

    Returns:
        float32 [M, M] CSR ``S``; a user's scores are ``history_row @ S``.
    """
    if neighbours <= 0 or batch <= 0:
        raise ValueError(f"neighbours and batch must be positive, got {neighbours} and {batch}")
    x = _binary(train, np.float64)
    xt = x.T.tocsr()  # row i lists the users of item i, so item blocks are cheap row slices
    n_items = x.shape[1]
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
    blocks = []
    for lo in range(0, n_items, batch):
        co = (xt[lo : lo + batch] @ x).tocsr()  # row j - lo: co-occurrence of item j with every item
        blocks.append(_top_per_row(_cosine(co, norms, lo, shrink), neighbours))
    if not blocks:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    # Row j of the stacked blocks holds item j's neighbours; transposing makes them column j.
    return sp.vstack(blocks).T.tocsr().astype(np.float32)


def _cosine(co: sp.csr_matrix, norms: np.ndarray, first_item: int, shrink: float) -> sp.csr_matrix:
    """Turn a block of co-occurrence rows (items first_item...) into cosine rows with no self-similarity."""
    row_item = first_item + np.repeat(np.arange(co.shape[0]), np.diff(co.indptr))
    sim = co.data / (norms[row_item] * norms[co.indices] + shrink)
    sim[co.indices == row_item] = 0.0
    out = sp.csr_matrix((sim, co.indices, co.indptr), shape=co.shape)
    out.eliminate_zeros()
    return out


def _top_per_row(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """Keep the ``n`` largest stored entries of each CSR row (ties by ascending column)."""
    row = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((m.indices, -m.data, row))
    rank_in_row = np.arange(len(order)) - m.indptr[row[order]]
    keep = order[rank_in_row < n]
    return sp.csr_matrix((m.data[keep], (row[keep], m.indices[keep])), shape=m.shape)


def itemknn_topk(
    history: sp.csr_matrix,
    train: sp.csr_matrix,
    k: int,
    users: np.ndarray,
    *,
    neighbours: int = 100,
    shrink: float = 0.0,
    batch: int = 1024,
) -> np.ndarray:
    """Cosine ItemKNN: score items by summed similarity to the user's history items.

    Args:
        history: [U, M] rows per user; stored non-zeros are the (binarised) history,
            which is both scored from and masked.
        train: [*, M] interactions the similarities are learned from.
        k: results per user.
        users: row ids into ``history``.
        neighbours: similar items kept per item (see :func:`itemknn_similarity`).
        shrink: similarity shrinkage term.
        batch: items per similarity block and users per scoring block; scoring holds a
            dense batch × M float32 array, with fewer users when that would pass 1 GB.

    Returns:
        int64 [len(users), k] item ids, highest score first (tie rules as in
        :func:`topk_excluding`); only items with a positive score are returned, -1 pads the rest.
    """
    _check_inputs(history, train, k)
    sim = itemknn_similarity(train, neighbours=neighbours, shrink=shrink, batch=batch)
    users = np.asarray(users, dtype=np.int64)
    out = np.full((len(users), k), -1, dtype=np.int64)
    step = max(1, min(batch, _SCORE_FLOATS // max(history.shape[1], 1)))  # a dense step × M block: 64 users at 4M items
    for lo in range(0, len(users), step):
        rows = _binary(history[users[lo : lo + step]])
        scores = (rows @ sim).toarray()
        # Items with no similarity to the history carry no evidence; -inf keeps them out.
        scores[scores <= 0] = -np.inf
        out[lo : lo + step] = topk_excluding(scores, rows, k)
    return out
