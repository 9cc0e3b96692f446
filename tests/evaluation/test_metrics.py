import math

import numpy as np
import pytest

from funnel.evaluation.metrics import (
    auc,
    calibration_bins,
    expected_calibration_error,
    gauc,
    hit_at_k_multi,
    hit_rate,
    logloss,
    mrr,
    multi_target_curves,
    ndcg,
    ndcg_at_k_multi,
    overlap_recall,
    rank_curves,
    recall_at_k,
    summarize,
    summarize_multi,
    target_ranks,
)


def test_target_ranks_present_absent_and_padding():
    topk = np.array([[5, 3, 9], [1, 2, -1], [4, -1, -1], [7, 8, 6]])
    targets = np.array([3, 9, -1, 6])
    # user 0: at position 1; user 1: absent; user 2: target -1 must not match padding; user 3: last.
    assert target_ranks(topk, targets).tolist() == [1, 3, 3, 2]


def test_target_ranks_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        target_ranks(np.zeros((2, 3), int), np.zeros(3, int))


def test_rank_metrics_hand_example():
    # K = 3, ranks [0, 2, 3(=not found)], k = 3:
    #   hr   = (1 + 1 + 0) / 3 = 2/3
    #   ndcg = (1/log2(2) + 1/log2(4) + 0) / 3 = (1 + 0.5) / 3
    #   mrr  = (1/1 + 1/3 + 0) / 3
    ranks = np.array([0, 2, 3])
    assert hit_rate(ranks, 3) == pytest.approx(2 / 3)
    assert ndcg(ranks, 3) == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert mrr(ranks, 3) == pytest.approx((1 + 1 / 3) / 3)
    # k = 2 drops the rank-2 hit.
    assert hit_rate(ranks, 2) == pytest.approx(1 / 3)
    assert ndcg(ranks, 2) == pytest.approx(1 / 3)
    assert mrr(ranks, 2) == pytest.approx(1 / 3)


@pytest.mark.parametrize("fn", [hit_rate, ndcg, mrr])
@pytest.mark.parametrize("k", [0, -1])
def test_rank_metrics_reject_non_positive_k(fn, k):
    with pytest.raises(ValueError):
        fn(np.array([0, 1]), k)


def test_recall_and_hit_multi_hand_example():
    topk = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [7, 8, 9, 10], [1, 2, 3, 4]])
    targets = [np.array([2, 4, 99]), np.array([6]), np.array([11, 12]), np.array([], dtype=np.int64)]
    # k = 2 (user 3 has no targets and is left out):
    #   user 0: top-2 {1, 2} holds 2 of {2, 4, 99} -> 1/3; user 1: 6 in {5, 6} -> 1; user 2: 0.
    #   recall = (1/3 + 1 + 0) / 3, hit = (1 + 1 + 0) / 3
    assert recall_at_k(topk, targets, 2) == pytest.approx((1 / 3 + 1) / 3)
    assert hit_at_k_multi(topk, targets, 2) == pytest.approx(2 / 3)
    # k = 4: user 0 gets 4 as well -> 2/3.
    assert recall_at_k(topk, targets, 4) == pytest.approx((2 / 3 + 1) / 3)
    with pytest.raises(ValueError):
        recall_at_k(topk, targets, 5)
    with pytest.raises(ValueError):
        hit_at_k_multi(topk, targets, 0)


def test_ndcg_multi_hand_example():
    topk = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [7, 8, 9, 10], [1, 2, 3, 4]])
    targets = [np.array([2, 4, 99]), np.array([6]), np.array([11, 12]), np.array([], dtype=np.int64)]
    # k = 4 (user 3 has no targets and is left out):
    #   user 0: hits at ranks 1 and 3 -> DCG 1/log2(3) + 1/log2(5); 3 targets -> IDCG 1 + 1/log2(3) + 1/log2(4)
    #   user 1: hit at rank 1 -> DCG 1/log2(3); 1 target -> IDCG 1
    #   user 2: no hit -> 0
    user0 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    user1 = 1 / math.log2(3)
    assert ndcg_at_k_multi(topk, targets, 4) == pytest.approx((user0 + user1) / 3)
    # k = 2: user 0 keeps only the rank-1 hit and the ideal has 2 places (min(3, 2)).
    user0_at2 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k_multi(topk, targets, 2) == pytest.approx((user0_at2 + user1) / 3)
    # Every target on top scores 1.
    assert ndcg_at_k_multi(np.array([[3, 1, 2]]), [np.array([1, 3])], 3) == pytest.approx(1.0)


def test_summarize_multi_keys_and_values():
    topk = np.array([[1, 2, 3], [4, 5, 6]])
    targets = [np.array([1, 9]), np.array([7])]
    out = summarize_multi(topk, targets, ks=(1, 3))
    assert set(out) == {"recall@1", "hr@1", "ndcg@1", "recall@3", "hr@3", "ndcg@3"}
    assert out["recall@3"] == pytest.approx(0.25) and out["hr@1"] == pytest.approx(0.5)
    assert out["ndcg@1"] == pytest.approx(0.5)


def test_auc_hand_example_with_tie():
    # positives score 0.8 and 0.4, negatives 0.4 and 0.1: pairs (0.8>0.4)=1, (0.8>0.1)=1,
    # (0.4=0.4)=0.5, (0.4>0.1)=1 -> 3.5 / 4.
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert auc([0, 1], [0.9, 0.1]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auc_matches_pair_counting_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 20, 300).astype(float)  # coarse scores force many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auc(labels, scores) == pytest.approx(brute)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError):
        auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_gauc_weights_by_size_and_skips_one_class_groups():
    groups = np.array([7, 7, 7, 7, 3, 3, 5, 5, 5])
    labels = np.array([1, 0, 0, 1, 1, 0, 1, 1, 1])
    scores = np.array([0.9, 0.8, 0.1, 0.5, 0.2, 0.6, 0.3, 0.2, 0.1])
    # group 7: positives 0.9, 0.5 vs negatives 0.8, 0.1 -> wins 1+1+0+1 = 3/4, size 4
    # group 3: positive 0.2 < negative 0.6 -> 0, size 2
    # group 5: positives only -> skipped
    # gauc = (4 * 0.75 + 2 * 0) / 6 = 0.5
    assert gauc(groups, labels, scores) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        gauc(np.array([1, 2]), np.array([1, 0]), np.array([0.3, 0.4]))


def test_logloss_hand_value_and_clipping():
    # -(log 0.8 + log(1 - 0.4)) / 2
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert logloss([1], [0.0], eps=1e-7) == pytest.approx(-math.log(1e-7))


def test_overlap_recall_hand_example():
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [-1, -1, -1, -1]])
    approx = np.array([[4, 9, 1, -1], [6, 5, 7, 8], [1, 2, 3, 4]])
    # query 0: {1, 4} of 4 -> 0.5; query 1: both valid ids -> 1; query 2: no valid exact ids, left out.
    assert overlap_recall(approx, exact) == pytest.approx(0.75)
    assert overlap_recall(exact[:2], exact[:2]) == 1.0


def test_summarize_keys_and_rounding():
    out = summarize(np.array([0, 2, 50]), ks=(10, 50))
    assert list(out) == ["hr@10", "ndcg@10", "mrr@10", "hr@50", "ndcg@50", "mrr@50"]
    assert out["hr@10"] == round(2 / 3, 6)
    assert out["mrr@50"] == round((1 + 1 / 3) / 3, 6)
    assert all(isinstance(v, float) for v in out.values())


def test_rank_curves_hand_example():
    # ranks [0, 2, 5], max_k = 3 (rank 5 is a miss at every K):
    #   K=1: hr 1/3, ndcg 1/3;  K=2: same;  K=3: hr 2/3, ndcg (1 + 1/log2(4)) / 3 = 0.5
    hr, nd = rank_curves(np.array([0, 2, 5]), 3)
    assert hr.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    assert nd.tolist() == pytest.approx([1 / 3, 1 / 3, 0.5])


def test_rank_curves_agree_with_point_metrics():
    ranks = np.random.default_rng(0).integers(0, 30, 200)
    hr, nd = rank_curves(ranks, 25)
    for k in (1, 7, 25):
        assert hr[k - 1] == pytest.approx(hit_rate(ranks, k))
        assert nd[k - 1] == pytest.approx(ndcg(ranks, k))


def test_multi_target_curves_hand_example():
    topk = np.array([[1, 2, 3], [5, 6, -1], [7, 8, 9]])
    targets = [np.array([2, 3]), np.array([5]), np.array([], dtype=np.int64)]
    # user 0 hits at ranks 1 and 2 of 2 targets; user 1 at rank 0 of 1; user 2 has no targets.
    #   recall: K=1 (0 + 1)/2, K=2 (1/2 + 1)/2, K=3 (1 + 1)/2
    #   ndcg user 0 (ideal: min(2, K) hits on top): K=1 0; K=2 (1/log2 3)/(1 + 1/log2 3); K=3 (1/log2 3 + 1/2)/(1 + 1/log2 3)
    c = multi_target_curves(topk, targets, 3)
    assert c["recall"].tolist() == pytest.approx([0.5, 0.75, 1.0])
    assert c["hr"].tolist() == pytest.approx([0.5, 1.0, 1.0])
    l3 = 1 / math.log2(3)
    assert c["ndcg"].tolist() == pytest.approx([0.5, (l3 / (1 + l3) + 1) / 2, ((l3 + 0.5) / (1 + l3) + 1) / 2])
    assert c["ndcg"][1] == pytest.approx(ndcg_at_k_multi(topk, targets, 2))


def test_calibration_bins_hand_example():
    labels = np.array([0, 1, 0, 1, 1])
    probs = np.array([0.1, 0.2, 0.6, 0.9, 1.0])
    mean_prob, rate, counts = calibration_bins(labels, probs, n_bins=2)
    # bin [0, .5): probs .1 .2, one positive; bin [.5, 1]: .6 .9 1.0 (1.0 goes to the last bin), two positives.
    assert counts.tolist() == [2, 3]
    assert mean_prob.tolist() == pytest.approx([0.15, 2.5 / 3])
    assert rate.tolist() == pytest.approx([0.5, 2 / 3])
    # ECE = (2 * |0.15 - 0.5| + 3 * |0.8333 - 0.6667|) / 5 = (0.7 + 0.5) / 5
    assert expected_calibration_error(labels, probs, n_bins=2) == pytest.approx(0.24)


def test_calibration_bins_empty_bins_are_nan():
    mean_prob, rate, counts = calibration_bins(np.array([1, 0]), np.array([0.05, 0.07]), n_bins=4)
    assert counts.tolist() == [2, 0, 0, 0]
    assert np.isnan(mean_prob[1:]).all() and np.isnan(rate[1:]).all()
    with pytest.raises(ValueError):
        calibration_bins(np.array([1]), np.array([0.5, 0.5]))


def test_calibration_bins_quantile_hand_example():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.01, 0.02, 0.03, 0.04])
    # Two quantile bins: edges [0.01, 0.025, 0.04] → {0.01, 0.02} and {0.03, 0.04}.
    mean_prob, rate, counts = calibration_bins(labels, probs, n_bins=2, strategy="quantile")
    assert counts.tolist() == [2, 2]
    assert mean_prob.tolist() == pytest.approx([0.015, 0.035])
    assert rate.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="strategy"):
        calibration_bins(labels, probs, strategy="log")
