import numpy as np

from funnel.events.schema import BEHAVIOR_CODE
from funnel.rank.kernels import candidate_columns
from funnel.recall.channels import recency_weights

PV, CART, FAV, BUY = (BEHAVIOR_CODE[b] for b in ("pv", "cart", "fav", "buy"))


def _columns(covisit=None, short=2):
    # One user, window of 4 slots (the first is padding); three candidates: item 7 (seen twice, once
    # carted, once bought), item 9 (unseen, category 5), padding.
    hist_items = np.array([[0, 7, 8, 7]])
    hist_categories = np.array([[5, 5, 6, 5]])  # the padding slot's category must not count
    hist_behaviors = np.array([[0, CART, PV, BUY]])
    hist_ts = np.array([[0, 100, 200, 3_700]])
    cand_items = np.array([[7, 9, 0]])
    cand_categories = np.array([[5, 5, 0]])
    cand_scores = np.array([[0.5, 0.25, -np.inf]], np.float32)
    cand_ranks = np.array([[0, 3, 2_000]])
    item_counts = np.array([0, 0, 0, 0, 0, 0, 0, 4, 0, 9])
    covisit = np.zeros((1, 3, 2), np.float32) if covisit is None else covisit
    return candidate_columns(
        hist_items, hist_categories, hist_behaviors, hist_ts, np.array([7_300]), cand_items, cand_categories, cand_scores, cand_ranks,
        item_counts, covisit, recency_weights(covisit.shape[-1]), short, 1024.0,
    )[0]  # fmt: skip


def test_candidate_columns_by_hand():
    covisit = np.array([[[2.0, 1.0], [0.0, 3.0], [0.0, 0.0]]], np.float32)  # [C, n]: oldest recent event first
    got = _columns(covisit)
    item7, item9, pad = got
    # recall score, log rank (capped at 1024), log count / 10
    assert item7[0] == 0.5 and item9[0] == 0.25 and pad[0] == 0.0
    np.testing.assert_allclose([item7[1], item9[1], pad[1]], [0.0, np.log1p(3) / np.log1p(1024), 1.0])
    np.testing.assert_allclose([item7[2], item9[2]], [np.log1p(4) / 10, np.log1p(9) / 10])
    # category 5 holds 2 of the 3 events, and 1 of the last 2
    np.testing.assert_allclose([item7[3], item7[4], item9[3], item9[4]], [2 / 3, 1 / 2, 2 / 3, 1 / 2])
    # co-visitation: the latest recent event weighs 1, the one before 0.5
    np.testing.assert_allclose([item7[5], item7[6], item9[5], item9[6]], [np.log1p(0.5 * 2 + 1), np.log1p(1), np.log1p(3), np.log1p(3)])
    # item 7: 2 of 3 events, last one an hour before now, carted and bought
    np.testing.assert_allclose(item7[7:], [2 / 3, np.log1p(1.0) / 10, 1.0, 1.0])
    assert (item9[7:] == 0).all()
    assert (pad[3:5] == 0).all()  # padding's category 0 matches no event: the window's padding slot never counts


def test_candidate_columns_short_window_wider_than_history():
    # A short-term window longer than the history is the whole history.
    np.testing.assert_allclose(_columns(short=10)[:2, 4], _columns(short=10)[:2, 3])
