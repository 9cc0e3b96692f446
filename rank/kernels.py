"""Compiled loops (numba) for the ranking features that compare each candidate with the user's window.

In numpy these features took some forty array calls of a few microseconds each, most
of a request's feature cost, and [B, C, L] temporaries in training. Here one pass per
(user, candidate) over the window computes them all, without temporaries, and
releases the GIL while it runs, so the server's event loop keeps going meanwhile.
The arithmetic follows the numpy definitions step for step (the same float64
operations), so the features match what earlier bundles were trained with; the one
exception is the latest co-visitation weight's log1p, computed in double here, which can
differ from numpy's float32 log1p by one float32 ulp.

Compiled code is cached beside this file (``cache=True``): a process compiles a kernel
once per argument type the first time it runs, in about a second, and later processes
load it.
"""

import numba
import numpy as np

from funnel.events.schema import BEHAVIOR_CODE
from funnel.recall.lookup import csr_pair_weights

PV, CART, FAV, BUY = (BEHAVIOR_CODE[b] for b in ("pv", "cart", "fav", "buy"))


@numba.njit(cache=True, nogil=True)
def candidate_columns(
    hist_items: np.ndarray,
    hist_categories: np.ndarray,
    hist_behaviors: np.ndarray,
    hist_ts: np.ndarray,
    now: np.ndarray,
    cand_items: np.ndarray,
    cand_categories: np.ndarray,
    cand_scores: np.ndarray,
    cand_ranks: np.ndarray,
    item_counts: np.ndarray,
    covisit: np.ndarray,
    recency: np.ndarray,
    short: int,
    max_rank: float,
) -> np.ndarray:
    """The per-candidate columns of :data:`rank.features.CANDIDATE_COLUMNS`, in that order.

    Args:
        hist_items, hist_categories, hist_behaviors, hist_ts: [B, L] the window,
            right-aligned, item 0 = padding.
        now: [B] request times (seconds).
        cand_items, cand_categories: [B, C] candidates (item 0 = padding).
        cand_scores: [B, C] recall scores; cand_ranks: [B, C] recall positions.
        item_counts: [M] training interactions per item id (ids past it count item 0's).
        covisit: float32 [B, C, n] co-visitation weights from the latest ``n`` window
            events to each candidate, oldest first (:meth:`recall.channels.CoVisitation.pair_scores`).
        short: events in the short-term category share.
        max_rank: recall ranks are capped here before the log.

    Returns:
        float64 [B, C, 11]: recall score (0 for padding), log recall rank, log count,
        category share over the window and over its last ``short`` events, recency-weighted
        and latest co-visitation (log1p), share of window events on the item, log-hours
        since the latest of them (0 if none), whether one was a cart or fav, whether one was a buy.
    """
    b, length = hist_items.shape
    c = cand_items.shape[1]
    n = covisit.shape[2]
    out = np.zeros((b, c, 11))
    rank_norm = np.log1p(max_rank)
    short_from = max(length - short, 0)
    for i in range(b):
        events = 0
        short_events = 0
        for l in range(length):
            if hist_items[i, l] > 0:
                events += 1
                if l >= short_from:
                    short_events += 1
        events = max(events, 1)
        short_events = max(short_events, 1)
        for j in range(c):
            item, category = cand_items[i, j], cand_categories[i, j]
            same_category = 0
            same_category_short = 0
            seen = 0
            last_seen = 0
            cart_fav = False
            bought = False
            for l in range(length):
                if hist_items[i, l] <= 0:
                    continue
                if hist_categories[i, l] == category:
                    same_category += 1
                    if l >= short_from:
                        same_category_short += 1
                if hist_items[i, l] == item:
                    last_seen = hist_ts[i, l] if seen == 0 else max(last_seen, hist_ts[i, l])
                    seen += 1
                    behavior = hist_behaviors[i, l]
                    cart_fav = cart_fav or behavior == CART or behavior == FAV
                    bought = bought or behavior == BUY
            weighted = 0.0
            for k in range(n):
                weighted += np.float64(covisit[i, j, k]) * recency[k]
            row = out[i, j]
            row[0] = np.float64(cand_scores[i, j]) if item > 0 else 0.0
            row[1] = np.log1p(min(np.float64(cand_ranks[i, j]), max_rank)) / rank_norm
            row[2] = np.log1p(np.float64(item_counts[item if item < len(item_counts) else 0])) / 10.0
            row[3] = same_category / events
            row[4] = same_category_short / short_events
            row[5] = np.log1p(weighted)
            row[6] = np.log1p(covisit[i, j, n - 1]) if n else 0.0
            row[7] = seen / events
            row[8] = np.log1p(max(now[i] - last_seen, 0) / 3600.0) / 10.0 if seen else 0.0
            row[9] = cart_fav
            row[10] = bought
    return out


@numba.njit(cache=True, nogil=True)
def builtin_dense(
    inputs: tuple,
    item_counts: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    recency: np.ndarray,
    popularity: np.ndarray,
    item_rows: np.ndarray,
    user_rows: np.ndarray,
    short: int,
    max_rank: float,
) -> np.ndarray:
    """Every built-in dense column in one pass, as float32, for requests at the bundle's fixed time.

    The same numbers as the registered groups of :mod:`rank.features` computed one by one
    and concatenated: :func:`candidate_columns` (its co-visitation weights looked up here
    too), then each candidate's row of the fixed-time popularity table and of the item
    table, then its user's row.

    Args:
        inputs: :func:`candidate_columns`' first nine arguments (the window, the request
            times and the candidates), in its order.
        item_counts, short, max_rank: as for :func:`candidate_columns`.
        indptr, indices, data: the co-visitation graph (CSR, columns ascending in each row).
        recency: [n] weights of the window's latest ``n`` events, oldest first.
        popularity: float32 [M, P] popularity per item id at the fixed time (row 0 zero).
        item_rows: float32 [M, I] business features per item id (row 0 zero).
        user_rows: float32 [B, U] the users' columns.

    Returns:
        float32 [B, C, 11 + P + I + U]; 0 for padding candidates. Ids past the tables
        read row 0.
    """
    hist_items, cand_items = inputs[0], inputs[5]
    b, length = hist_items.shape
    c = cand_items.shape[1]
    n = min(len(recency), length)
    covisit = csr_pair_weights(indptr, indices, data, hist_items[:, length - n :], cand_items)  # [B, C, n]
    columns = candidate_columns(*inputs, item_counts, covisit, recency[len(recency) - n :], short, max_rank)  # [B, C, 11]
    p, q, u = popularity.shape[1], item_rows.shape[1], user_rows.shape[1]
    out = np.zeros((b, c, 11 + p + q + u), np.float32)
    for i in range(b):
        for j in range(c):
            item = cand_items[i, j]
            if item <= 0:
                continue
            row = out[i, j]
            for k in range(11):
                row[k] = columns[i, j, k]
            at = item if item < len(popularity) else 0
            for k in range(p):
                row[11 + k] = popularity[at, k]
            at = item if item < len(item_rows) else 0
            for k in range(q):
                row[11 + p + k] = item_rows[at, k]
            for k in range(u):
                row[11 + p + q + k] = user_rows[i, k]
    return out


@numba.njit(cache=True, nogil=True)
def user_window_columns(items: np.ndarray, behaviors: np.ndarray, ts: np.ndarray, lengths: np.ndarray, now: np.ndarray) -> np.ndarray:
    """The per-user columns of :data:`rank.business.USER_FEATURES`, in that order.

    Args:
        items, behaviors, ts: [B, L] the window, right-aligned, item 0 = padding.
        lengths: [B] real events in each row.
        now: [B] request times (seconds).

    Returns:
        float32 [B, 9]: carts never bought in the window / carts, buys of an item bought
        earlier in the window / buys, buys / events, distinct active days / 30 (at most 1),
        log1p(hours since the latest event) / 10, and the latest event's behaviour one-hot
        (pv, cart, fav, buy; all 0 for an empty window).
    """
    b, length = items.shape
    out = np.zeros((b, 9), np.float32)
    for i in range(b):
        events = carts = buys = cart_no_buy = rebuy = days = 0
        for l in range(length):
            item = items[i, l]
            if item <= 0:
                continue
            events += 1
            behavior = behaviors[i, l]
            if behavior == CART or behavior == BUY:
                # A cart counts as a wishlist entry unless the item is bought anywhere in
                # the window; a buy is a repurchase if the item was bought before it.
                bought_before = bought_any = False
                for m in range(length):
                    if items[i, m] == item and behaviors[i, m] == BUY:
                        bought_any = True
                        bought_before = bought_before or m < l
                if behavior == CART:
                    carts += 1
                    cart_no_buy += not bought_any
                else:
                    buys += 1
                    rebuy += bought_before
            day = ts[i, l] // 86_400
            first_of_day = True
            for m in range(l):
                if items[i, m] > 0 and ts[i, m] // 86_400 == day:
                    first_of_day = False
                    break
            days += first_of_day and day >= 0
        latest = ts[i, length - 1] if lengths[i] > 0 else now[i]
        out[i, 0] = cart_no_buy / max(carts, 1)
        out[i, 1] = rebuy / max(buys, 1)
        out[i, 2] = buys / max(events, 1)
        out[i, 3] = min(days / 30.0, 1.0)
        out[i, 4] = np.log1p(max(now[i] - latest, 0) / 3600.0) / 10.0
        if lengths[i] > 0:
            last = behaviors[i, length - 1]
            out[i, 5] = last == PV
            out[i, 6] = last == CART
            out[i, 7] = last == FAV
            out[i, 8] = last == BUY
    return out
