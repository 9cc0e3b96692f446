"""Offline evaluation metrics: full-ranking (HR/NDCG/MRR; multi-target Recall/HR/NDCG), CTR (AUC/GAUC/logloss) and ANN overlap.

Everything is vectorised numpy; no function loops over users in Python.
"""

from collections.abc import Sequence

import numpy as np


def _check_k(k: int) -> None:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")


def _mean(values: np.ndarray) -> float:
    """Mean as a float, nan for an empty array (without numpy's RuntimeWarning)."""
    return float(values.mean()) if values.size else float("nan")


def target_ranks(topk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of each user's single target in their ranked list.

    Args:
        topk: int [U, K] ranked item ids, best first; -1 is padding and never matches.
        targets: int [U] the held-out item of each user.

    Returns:
        int64 [U]: the target's position, or K where it is not in the list. Pass
        ``k <= K`` to the rank metrics below, since K itself means "not found".
    """
    topk = np.asarray(topk)
    targets = np.asarray(targets)
    if topk.ndim != 2 or targets.shape != (topk.shape[0],):
        raise ValueError(f"expected topk [U, K] and targets [U], got {topk.shape} and {targets.shape}")
    match = (topk == targets[:, None]) & (topk >= 0)
    return np.where(match.any(axis=1), match.argmax(axis=1), topk.shape[1]).astype(np.int64)


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of users whose target is ranked in the top ``k``.

    Args:
        ranks: int [U] from :func:`target_ranks`.
        k: cut-off, at most the K the ranks were computed with.

    Returns:
        HR@k averaged over users (nan when there are none).
    """
    _check_k(k)
    return _mean(np.asarray(ranks) < k)


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item per user: 1/log2(rank + 2) inside the top ``k``, else 0.

    Args:
        ranks: int [U] from :func:`target_ranks`.
        k: cut-off, at most the K the ranks were computed with.

    Returns:
        NDCG@k averaged over users (nan when there are none).
    """
    _check_k(k)
    ranks = np.asarray(ranks)
    return _mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0))


def mrr(ranks: np.ndarray, k: int) -> float:
    """Mean reciprocal rank truncated at ``k``: 1/(rank + 1) inside the top ``k``, else 0.

    Args:
        ranks: int [U] from :func:`target_ranks`.
        k: cut-off, at most the K the ranks were computed with.

    Returns:
        MRR@k averaged over users (nan when there are none).
    """
    _check_k(k)
    ranks = np.asarray(ranks)
    return _mean(np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0))


def _multi_target_ranks(topk: np.ndarray, targets: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every target's owner (user index) and 0-based rank in the top ``k`` (``k`` = missed), and each user's target count."""
    _check_k(k)
    topk = np.asarray(topk)
    if topk.ndim != 2 or len(targets) != topk.shape[0]:
        raise ValueError(f"expected topk [U, K] and U target arrays, got {topk.shape} and {len(targets)}")
    if k > topk.shape[1]:
        raise ValueError(f"k={k} exceeds the {topk.shape[1]} ranked items per user")
    sizes = np.fromiter((len(t) for t in targets), dtype=np.int64, count=len(targets))
    flat = np.concatenate([np.asarray(t, dtype=np.int64).ravel() for t in targets]) if len(targets) else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(targets)), sizes)
    # Padding is -1 and item ids are non-negative, so padding can never count as a hit.
    match = topk[owner, :k] == flat[:, None]
    ranks = np.where(match.any(axis=1), match.argmax(axis=1), k)
    return owner, ranks, sizes


def _multi_target_hits(topk: np.ndarray, targets: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user count of targets inside the top ``k`` and number of targets, for users with any."""
    owner, ranks, sizes = _multi_target_ranks(topk, targets, k)
    hits = np.bincount(owner, weights=ranks < k, minlength=len(sizes))
    keep = sizes > 0
    return hits[keep], sizes[keep]


def recall_at_k(topk: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    """Multi-target Recall@k (ComiRec protocol): per user |top-k ∩ targets| / |targets|, averaged.

    Args:
        topk: int [U, K] ranked item ids, best first; -1 is padding.
        targets: U int arrays, the distinct held-out items of each user; users with an
            empty array are left out of the average.
        k: cut-off, 1 <= k <= K.

    Returns:
        Recall@k averaged over users with targets (nan when there are none).
    """
    hits, sizes = _multi_target_hits(topk, targets, k)
    return _mean(hits / sizes)


def hit_at_k_multi(topk: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    """Multi-target HitRate@k: share of users with at least one target in the top ``k``.

    Args:
        topk: int [U, K] ranked item ids, best first; -1 is padding.
        targets: U int arrays of held-out items; users with an empty array are left out.
        k: cut-off, 1 <= k <= K.

    Returns:
        HitRate@k averaged over users with targets (nan when there are none).
    """
    hits, _ = _multi_target_hits(topk, targets, k)
    return _mean(hits > 0)


def ndcg_at_k_multi(topk: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    """Multi-target NDCG@k: per user DCG of the hits over the DCG of a list with every target on top.

    DCG sums 1/log2(rank + 2) over the targets in the top ``k`` (0-based rank); the ideal
    DCG puts min(|targets|, k) hits in the first places. ComiRec's released code normalises
    by an ideal built from the hit count instead (one hit can score 1.0 however many targets
    were missed), so its NDCG figures are not comparable with these.

    Args:
        topk: int [U, K] ranked item ids, best first, without repeats; -1 is padding.
        targets: U int arrays, the distinct held-out items of each user; users with an
            empty array are left out of the average.
        k: cut-off, 1 <= k <= K.

    Returns:
        NDCG@k averaged over users with targets (nan when there are none).
    """
    owner, ranks, sizes = _multi_target_ranks(topk, targets, k)
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    dcg = np.bincount(owner, weights=gains, minlength=len(sizes))
    ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))
    keep = sizes > 0
    return _mean(dcg[keep] / ideal[np.minimum(sizes[keep], k) - 1])


def _group_aucs(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUC and size of every group holding both classes, via within-group average ranks (Mann-Whitney U)."""
    groups, scores = np.asarray(groups), np.asarray(scores, dtype=np.float64)
    pos = np.asarray(labels) != 0
    if not (groups.shape == pos.shape == scores.shape) or pos.ndim != 1:
        raise ValueError(f"groups, labels and scores must be 1-d and equally long, got {groups.shape}, {pos.shape}, {scores.shape}")
    if not len(pos):
        return np.zeros(0), np.zeros(0)
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], pos[order]
    n = len(g)
    idx = np.arange(n)
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_block = new_group | np.r_[True, s[1:] != s[:-1]]
    group_id = np.cumsum(new_group) - 1
    group_start = idx[new_group][group_id]
    block_id = np.cumsum(new_block) - 1
    block_start = idx[new_block]
    block_size = np.diff(np.r_[block_start, n])
    # Tied scores share the mean of the 1-based ranks they span, which scores a tie as half a win.
    rank = (block_start - group_start[block_start])[block_id] + (block_size[block_id] + 1) / 2.0
    n_groups = int(new_group.sum())
    size = np.bincount(group_id, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(group_id, weights=y, minlength=n_groups)
    pos_rank_sum = np.bincount(group_id, weights=rank * y, minlength=n_groups)
    n_neg = size - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    aucs = (pos_rank_sum[both] - n_pos[both] * (n_pos[both] + 1) / 2.0) / (n_pos[both] * n_neg[both])
    return aucs, size[both]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC: the probability a random positive outscores a random negative, ties counting 0.5.

    Args:
        labels: [N] binary labels (non-zero is positive).
        scores: [N] predicted scores; only their order matters.

    Returns:
        The AUC.

    Raises:
        ValueError: when the labels hold a single class.
    """
    labels = np.asarray(labels)
    aucs, _ = _group_aucs(np.zeros(labels.shape, np.int8), labels, scores)
    if not len(aucs):
        raise ValueError("AUC needs both positive and negative labels")
    return float(aucs[0])


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: per-group (e.g. per-user) AUC averaged with weights equal to group sizes.

    Args:
        groups: [N] group id of each sample.
        labels: [N] binary labels (non-zero is positive).
        scores: [N] predicted scores.

    Returns:
        The size-weighted mean AUC over groups holding both classes; one-class groups are skipped.

    Raises:
        ValueError: when no group holds both classes.
    """
    aucs, sizes = _group_aucs(groups, labels, scores)
    if not len(aucs):
        raise ValueError("GAUC needs at least one group with both positive and negative labels")
    return float((aucs * sizes).sum() / sizes.sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy.

    Args:
        labels: [N] labels in {0, 1}.
        probs: [N] predicted probabilities of the positive class.
        eps: probabilities are clipped to [eps, 1 - eps] so a confident miss costs a finite loss.

    Returns:
        The mean log loss (nan when there are no samples).
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    return _mean(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def overlap_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Recall of approximate nearest-neighbour search against exact search.

    Args:
        approx: int [Q, K'] ids returned by the ANN index; -1 is padding.
        exact: int [Q, K] ids returned by exact search; -1 padding is ignored.

    Returns:
        Mean over queries of the fraction of valid exact ids present in the approx row;
        queries with no valid exact id are left out (nan when none is left).
    """
    approx, exact = np.asarray(approx, dtype=np.int64), np.asarray(exact, dtype=np.int64)
    if approx.ndim != 2 or exact.ndim != 2 or len(approx) != len(exact):
        raise ValueError(f"expected approx [Q, K'] and exact [Q, K], got {approx.shape} and {exact.shape}")
    if exact.size == 0 or (exact < 0).all():
        return float("nan")
    # Folding the query index into the key turns per-row membership into one np.isin call.
    width = max(int(exact.max()), int(approx.max(initial=-1))) + 2
    rows = np.arange(len(exact))[:, None]
    found = np.isin(rows * width + exact + 1, rows * width + approx + 1)
    valid = exact >= 0
    n_valid = valid.sum(axis=1)
    keep = n_valid > 0
    return _mean((found & valid).sum(axis=1)[keep] / n_valid[keep])


def summarize(ranks: np.ndarray, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """HR, NDCG and MRR at each cut-off, as a flat dict.

    Args:
        ranks: int [U] from :func:`target_ranks`.
        ks: cut-offs, each at most the K the ranks were computed with.

    Returns:
        ``{"hr@10": ..., "ndcg@10": ..., "mrr@10": ..., "hr@50": ...}`` rounded to 6 decimals.
    """
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = round(hit_rate(ranks, k), 6)
        out[f"ndcg@{k}"] = round(ndcg(ranks, k), 6)
        out[f"mrr@{k}"] = round(mrr(ranks, k), 6)
    return out


def summarize_multi(topk: np.ndarray, targets: Sequence[np.ndarray], ks: Sequence[int] = (20, 50)) -> dict[str, float]:
    """Multi-target Recall, HitRate and NDCG at each cut-off, as a flat dict.

    Args:
        topk: int [U, K] ranked item ids, best first; -1 is padding.
        targets: U int arrays, the distinct held-out items of each user.
        ks: cut-offs, each at most K.

    Returns:
        ``{"recall@20": ..., "hr@20": ..., "ndcg@20": ..., "recall@50": ...}`` rounded to 6 decimals.
    """
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = round(recall_at_k(topk, targets, k), 6)
        out[f"hr@{k}"] = round(hit_at_k_multi(topk, targets, k), 6)
        out[f"ndcg@{k}"] = round(ndcg_at_k_multi(topk, targets, k), 6)
    return out
