"""The evaluation's pair construction and ranker metrics on hand-built inputs."""

from types import SimpleNamespace

import numpy as np
import pytest

from funnel.evaluation import protocol
from funnel.evaluation.protocol import _batch_pairs, _is_target, _lift, _Pairs, _ranker_report
from funnel.events.schema import BEHAVIOR_CODE
from funnel.events.sequences import Sequences


def test_is_target_matches_rows_and_never_padding():
    items = np.array([[3, 5, 0], [7, 3, 2]])
    targets = [np.array([5]), np.array([2, 9])]
    assert _is_target(items, targets, num_items=10).tolist() == [[False, True, False], [False, False, True]]
    assert not _is_target(np.array([[0, 0]]), [np.array([0])], num_items=10).any()


def test_batch_pairs_keeps_users_with_a_recalled_target_and_labels_heads_by_behaviour():
    # Two users; user 0's target (item 4, bought) is recalled, user 1's (item 9) is not.
    seqs = Sequences.from_encoded(
        np.array([0, 0, 1, 1]),
        np.array([1, 4, 2, 9]),
        np.ones(4, np.int64),
        np.array([BEHAVIOR_CODE["pv"], BEHAVIOR_CODE["buy"], BEHAVIOR_CODE["pv"], BEHAVIOR_CODE["pv"]]),
        np.arange(4),
        2,
    )
    ranked = SimpleNamespace(
        items=np.array([[6, 4, 7, 0], [5, 6, 8, 0]]),
        scores=np.array([[0.9, 0.8, 0.1, 0.0], [0.7, 0.6, 0.5, 0.0]], np.float32),
        head_scores={"click": np.full((2, 4), 0.5, np.float32), "buy": np.full((2, 4), 0.2, np.float32)},
    )
    pairs = _batch_pairs(ranked, seqs, starts=np.array([1, 3]), ends=np.array([2, 4]), num_items=10, offset=5)
    assert pairs.groups.tolist() == [5, 5, 5]  # padding dropped, user 1 left out
    assert pairs.labels.tolist() == [False, True, False]
    assert pairs.scores.tolist() == pytest.approx([0.9, 0.8, 0.1])
    assert pairs.head_labels["buy"].tolist() == [False, True, False]
    assert set(pairs.heads) == {"click", "buy"}


def test_ranker_report_hand_example():
    # User 0: positive 0.9 over negatives 0.5, 0.1 → AUC 1. User 1: positive 0.2 between 0.4 and 0.1 → AUC 1/2.
    # Pooled: the positives (0.9, 0.2) beat 4 and 2 of the 4 negatives → AUC 6/8.
    # GAUC weights by pairs per user: (3 * 1 + 3 * 0.5) / 6 = 0.75.
    scores = np.array([0.9, 0.5, 0.1, 0.2, 0.4, 0.1], np.float32)
    labels = np.array([1, 0, 0, 1, 0, 0], bool)
    pairs = _Pairs(np.array([0, 0, 0, 1, 1, 1]), labels, scores, {"click": scores}, {"click": labels})
    r = _ranker_report(pairs, n_users=4)
    assert (r["users"], r["pairs"], r["recalled_share"]) == (2, 6, 0.5)
    assert r["auc"] == pytest.approx(0.75) and r["gauc"] == pytest.approx(0.75)
    expected = -(np.log(0.9) + np.log(0.5) + np.log(0.9) + np.log(0.2) + np.log(0.6) + np.log(0.9)) / 6
    assert r["logloss"] == pytest.approx(expected, abs=1e-5)
    assert "heads" not in r  # one head: nothing to break down


def test_ranker_report_per_head_auc_and_heads_without_positives():
    scores = np.array([0.9, 0.5, 0.1], np.float32)
    labels = np.array([1, 0, 0], bool)
    heads = {"click": scores, "buy": np.array([0.1, 0.3, 0.2], np.float32)}
    pairs = _Pairs(np.zeros(3, np.int64), labels, scores, heads, {"click": labels, "buy": np.zeros(3, bool)})
    r = _ranker_report(pairs, n_users=1)
    assert r["heads"] == {"click": {"auc": 1.0, "positives": 1}, "buy": {"auc": None, "positives": 0}}


def test_lift_ratio_and_zero_recall():
    recall = {"hr@10": 0.2, "ndcg@10": 0.1, "hr@50": 0.4, "ndcg@50": 0.15, "mrr@10": 0.05}
    final = {"hr@10": 0.3, "ndcg@10": 0.15, "hr@50": 0.4, "ndcg@50": 0.2}
    lift = _lift(recall, final)
    assert lift["ndcg@10_ratio"] == pytest.approx(1.5)
    assert set(lift["recall"]) == {"hr@10", "ndcg@10", "hr@50", "ndcg@50"}
    assert _lift({**recall, "ndcg@10": 0.0}, final)["ndcg@10_ratio"] is None


def test_small_test_sets_get_a_sampling_warning():
    from funnel.evaluation.protocol import sample_warnings

    assert sample_warnings(5000, {"hr@10": 0.2}) == []
    (some,) = sample_warnings(100, {"hr@10": 0.2})
    assert "only 100 test users" in some and "±0.078" in some  # 1.96 * sqrt(0.2 * 0.8 / 100)
    (none,) = sample_warnings(114, {"hr@10": 0.0})
    assert "up to 0.026 (no hit in 114 users)" in none
    assert "recall@10" in sample_warnings(50, {"recall@10": 0.1})[0]


def test_itemknn_history_is_cut_to_the_deepest_depth_within_the_pair_budget(monkeypatch):
    lengths = [10, 4, 1]
    users = np.repeat(np.arange(3), lengths)
    seqs = Sequences.from_encoded(users, np.arange(1, 16), np.zeros(15, np.int64), np.ones(15, np.int64), np.arange(15), 3)
    no_target = np.full(3, -1)
    full, depth = protocol._itemknn_matrix(seqs, no_target, 16)
    assert depth is None and full.nnz == 15
    monkeypatch.setattr(protocol, "ITEMKNN_PAIRS", 60)  # depth 5: 25 + 16 + 1 = 42 pairs; depth 6: 36 + 16 + 1 = 53; 7: 66
    cut, depth = protocol._itemknn_matrix(seqs, no_target, 16)
    assert depth == 6 and cut.getnnz(axis=1).tolist() == [6, 4, 1]
    assert cut[0].indices.tolist() == list(range(5, 11))  # the most recent six of user 0's items 1..10
    # A held-out target ends the history first.
    cut, depth = protocol._itemknn_matrix(seqs, np.array([3, -1, -1]), 16)
    assert depth is None and cut.getnnz(axis=1).tolist() == [3, 4, 1]
