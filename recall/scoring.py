"""Exact top-k scoring of user vectors against every item, with seen items masked."""

import numpy as np
import scipy.sparse as sp
import torch

BLOCK_FLOATS = 1 << 26
"""Most scores held at once (256 MB of float32): the user batch shrinks as the catalogue grows,
so scoring 4M items stays bounded (1,024 users x 870k items would be 3.5 GB)."""


def subset_rows(among: np.ndarray) -> np.ndarray:
    """Item ids where bool [M] ``among`` holds, after the padding row 0: rows of a sub-catalogue whose row 0 stays padding."""
    return np.concatenate([[0], np.flatnonzero(among[1:]) + 1])


def exact_topk(
    user_vecs: np.ndarray, item_vecs: np.ndarray, k: int, exclude: sp.csr_matrix | None = None, batch: int = 1024, among: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-k over the whole catalogue (item row 0 is padding and never returned).

    Args:
        user_vecs: [U, d] float32.
        item_vecs: [M, d] float32; row 0 is the padding id.
        k: results per user.
        exclude: optional [U, M] sparse matrix; non-zero entries are never returned.
        batch: most users scored at a time; fewer when ``batch × M`` would pass :data:`BLOCK_FLOATS`.
        among: optional bool [M]; only these items compete (e.g. the recommendable ones).

    Returns:
        (ids [U, k] int64, scores [U, k] float32), best first.
    """
    if among is not None:
        # Score the subset only, then map its rows back to item ids; row 0 stays padding.
        rows = subset_rows(among)
        sub = exclude.tocsc()[:, rows].tocsr() if exclude is not None else None
        ids, scores = exact_topk(user_vecs, item_vecs[rows], k, sub, batch)
        return rows[ids], scores
    items = torch.from_numpy(np.ascontiguousarray(item_vecs, dtype=np.float32))
    k = min(k, len(item_vecs) - 1)
    batch = max(1, min(batch, BLOCK_FLOATS // max(len(item_vecs), 1)))
    ids, scores = [], []
    for lo in range(0, len(user_vecs), batch):
        s = torch.from_numpy(np.ascontiguousarray(user_vecs[lo : lo + batch], dtype=np.float32)) @ items.T  # [b, M]
        s[:, 0] = float("-inf")
        if exclude is not None:
            block = exclude[lo : lo + batch].tocoo()
            s[torch.from_numpy(block.row.astype(np.int64)), torch.from_numpy(block.col.astype(np.int64))] = float("-inf")
        top = torch.topk(s, k, dim=1)
        ids.append(top.indices.numpy())
        scores.append(top.values.numpy())
    if not ids:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(ids).astype(np.int64), np.concatenate(scores)
