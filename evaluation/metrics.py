"""Offline evaluation metrics: full-ranking (HR/NDCG/MRR; multi-target Recall/HR/NDCG; curves over K), CTR (AUC/GAUC/logloss, calibration) and ANN overlap.

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
    """HR@k: the share of users whose target is ranked in the top ``k`` (see :func:`rank_metric`)."""
    return rank_metric(ranks, k, lambda r: np.ones(r.shape))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item per user: 1/log2(rank + 2) inside the top ``k``, else 0 (see :func:`rank_metric`)."""
    return rank_metric(ranks, k, lambda r: 1.0 / np.log2(r + 2.0))


def mrr(ranks: np.ndarray, k: int) -> float:
    """MRR@k: 1/(rank + 1) inside the top ``k``, else 0 (see :func:`rank_metric`)."""
    return rank_metric(ranks, k, lambda r: 1.0 / (r + 1.0))


def rank_metric(ranks: np.ndarray, k: int, gain) -> float:
    """A single-target metric truncated at ``k``, averaged over users.

    Args:
        ranks: int [U] from :func:`target_ranks`.
        k: cut-off, at most the K the ranks were computed with.
        gain: ranks -> each user's gain where the target is inside the top ``k``
            (0 outside).

    Returns:
        The mean gain (nan when there are no users).
    """
    _check_k(k)
    ranks = np.asarray(ranks)
    return _mean(np.where(ranks < k, gain(ranks), 0.0))


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


def rank_curves(ranks: np.ndarray, max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """HR@K and NDCG@K for every K in 1..max_k at once, from single-target ranks.

    Args:
        ranks: int [U] from :func:`target_ranks` (a rank >= max_k is a miss at every K).
        max_k: largest cut-off, at most the K the ranks were computed with.

    Returns:
        float64 ([max_k], [max_k]): element ``K - 1`` equals ``hit_rate(ranks, K)`` and
        ``ndcg(ranks, K)``; nan when there are no users.
    """
    _check_k(max_k)
    ranks = np.asarray(ranks)
    if not ranks.size:
        return np.full(max_k, np.nan), np.full(max_k, np.nan)
    inside = ranks[ranks < max_k]
    # A user counts from their rank's cut-off onwards, so the curves are cumulative sums.
    hits = np.cumsum(np.bincount(inside, minlength=max_k))
    gains = np.cumsum(np.bincount(inside, weights=1.0 / np.log2(inside + 2.0), minlength=max_k))
    return hits / ranks.size, gains / ranks.size


def multi_target_curves(topk: np.ndarray, targets: Sequence[np.ndarray], max_k: int) -> dict[str, np.ndarray]:
    """Multi-target Recall@K, HitRate@K and NDCG@K for every K in 1..max_k at once.

    Args:
        topk: int [U, K] ranked item ids, best first, without repeats; -1 is padding.
        targets: U int arrays of distinct held-out items; users with none are left out.
        max_k: largest cut-off, 1 <= max_k <= K.

    Returns:
        ``{"recall": [max_k], "hr": [max_k], "ndcg": [max_k]}``; element ``K - 1`` equals
        :func:`recall_at_k`, :func:`hit_at_k_multi` and :func:`ndcg_at_k_multi` at K.
    """
    owner, ranks, sizes = _multi_target_ranks(topk, targets, max_k)
    hit = ranks < max_k
    per_rank = np.zeros((len(sizes), max_k))  # [U, max_k] hits at each position
    np.add.at(per_rank, (owner[hit], ranks[hit]), 1.0)
    keep = sizes > 0
    if not keep.any():
        return {name: np.full(max_k, np.nan) for name in ("recall", "hr", "ndcg")}
    per_rank, sizes = per_rank[keep], sizes[keep]
    hits = np.cumsum(per_rank, axis=1)  # [U', max_k]
    dcg = np.cumsum(per_rank / np.log2(np.arange(max_k) + 2.0), axis=1)
    ideal_at = np.cumsum(1.0 / np.log2(np.arange(max_k) + 2.0))
    ideal = ideal_at[np.minimum(sizes[:, None], np.arange(1, max_k + 1)[None, :]) - 1]  # [U', max_k]
    return {
        "recall": (hits / sizes[:, None]).mean(0),
        "hr": (hits > 0).mean(0),
        "ndcg": (dcg / ideal).mean(0),
    }


def calibration_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10, strategy: str = "uniform") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability diagram data: probability bins with their mean prediction and observed positive rate.

    Args:
        labels: [N] binary labels (non-zero is positive).
        probs: [N] predicted probabilities in [0, 1].
        n_bins: number of bins.
        strategy: ``uniform``: bin ``i`` holds ``i/n <= p < (i+1)/n`` (1.0 goes to the last);
            ``quantile``: edges at the quantiles of ``probs``, so bins hold about equal
            counts (useful when predictions crowd a narrow range); a value on an edge goes
            to the bin above it, the maximum to the last bin, and tied edges leave empty bins.

    Returns:
        float64 ([n_bins] mean predicted probability, [n_bins] share of positives,
        int64 [n_bins] sample count); the first two are nan for empty bins.
    """
    if n_bins <= 0:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    y = (np.asarray(labels) != 0).astype(np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels and probs must be 1-d and equally long, got {y.shape} and {p.shape}")
    if strategy == "uniform":
        idx = (p * n_bins).astype(np.int64)
    elif strategy == "quantile":
        edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)) if p.size else np.linspace(0.0, 1.0, n_bins + 1)
        idx = np.searchsorted(edges, p, side="right") - 1
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")
    idx = np.clip(idx, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(idx, weights=p, minlength=n_bins) / counts
        rate = np.bincount(idx, weights=y, minlength=n_bins) / counts
    return mean_prob, rate, counts


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean gap between predicted probability and observed positive rate over the bins of :func:`calibration_bins`.

    Args:
        labels: [N] binary labels.
        probs: [N] predicted probabilities in [0, 1].
        n_bins: equal-width bins over [0, 1].

    Returns:
        The ECE in [0, 1] (nan when there are no samples).
    """
    mean_prob, rate, counts = calibration_bins(labels, probs, n_bins)
    filled = counts > 0
    if not filled.any():
        return float("nan")
    return float((counts[filled] * np.abs(mean_prob[filled] - rate[filled])).sum() / counts.sum())


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
