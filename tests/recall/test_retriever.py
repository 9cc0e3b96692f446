import numpy as np
import pytest
import scipy.sparse as sp

from funnel.recall.retriever import Excluded, RecallConfig


def test_excluded_answers_per_user_membership():
    ex = Excluded(sp.csr_matrix(([1.0, 1.0, 1.0], ([0, 0, 1], [5, 2, 7])), shape=(3, 10)))
    assert ex.most_per_row == 2
    ids = np.array([[2, 7, 5, 0], [2, 7, 5, 0], [2, 7, 5, 9]])
    assert ex.ids(ids).tolist() == [[True, False, True, False], [False, True, False, False], [False] * 4]
    assert ex.pairs(np.array([1, 1]), np.array([7, 9])).tolist() == [True, False]


def test_nothing_excluded():
    ex = Excluded(sp.csr_matrix((2, 10)))
    assert ex.most_per_row == 0
    assert ex.ids(np.array([[1, 2, 3], [4, 5, 6]])).shape == (2, 3) and not ex.ids(np.array([[1, 2, 3], [4, 5, 6]])).any()


def test_per_user_id_arrays_exclude_like_the_sparse_matrix():
    rows = [np.array([2, 5]), np.array([7]), np.array([], np.int64)]
    ex = Excluded(rows, width=10)
    want = Excluded(sp.csr_matrix(([1.0, 1.0, 1.0], ([0, 0, 1], [5, 2, 7])), shape=(3, 10)))
    assert ex.most_per_row == want.most_per_row == 2
    ids = np.array([[2, 7, 5, 0], [2, 7, 5, 0], [2, 7, 5, 9]])
    assert ex.ids(ids).tolist() == want.ids(ids).tolist()
    assert not Excluded([], width=10).most_per_row


def test_candidate_counts_parse_any_subset_of_fields():
    assert RecallConfig.parse_counts("two_tower=150, covisit=50,popular=0") == {"two_tower": 150, "covisit": 50, "popular": 0}
    assert RecallConfig.parse_counts("recent=3") == {"recent": 3}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "no counts"),
        ("towers=5", "FIELD one of two_tower, covisit, popular, recent"),
        ("two_tower", "FIELD=COUNT"),
        ("covisit=-1", "whole number"),
        ("popular=2.5", "whole number"),
        ("popular=\u00b2", "whole number"),
        ("two_tower=0", "two_tower must be at least 1"),
        ("recent=0", "recent must be at least 1"),
    ],
)
def test_bad_candidate_counts_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        RecallConfig.parse_counts(spec)
