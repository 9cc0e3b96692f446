import numpy as np
import scipy.sparse as sp

from events.sequences import Sequences
from recall.channels import CoVisitation, Popularity, top_per_row


def seqs(users, items):
    n = len(users)
    return Sequences.from_encoded(np.array(users), np.array(items), np.ones(n, np.int64), np.ones(n, np.int8), np.arange(n), max(users) + 1)


def test_top_per_row_orders_and_pads():
    m = sp.csr_matrix(np.array([[0, 3, 1, 2], [0, 0, 0, 0], [5, 0, 0, 0]], dtype=np.float32))
    cols, vals = top_per_row(m, 2)
    assert cols.tolist() == [[1, 3], [0, 0], [0, 0]]
    assert vals[0].tolist() == [3, 2] and np.isneginf(vals[1]).all() and vals[2, 0] == 5


def test_covisitation_links_neighbours_within_window_and_user():
    s = seqs([1, 1, 1, 2, 2], [1, 2, 3, 4, 5])
    cv = CoVisitation.fit(s, np.ones(5, bool), 6, window=1, neighbours=5)
    g = cv.graph.toarray()
    assert g[1, 2] > 0 and g[2, 3] > 0 and g[4, 5] > 0
    assert g[1, 3] == 0  # two steps apart, window 1
    assert g[3, 4] == 0  # different users
    assert g[1, 2] > g[2, 1]  # forward pairs weigh more
    scores = cv.scores(np.array([[0, 1]])).toarray()
    assert scores[0, 2] > 0 and scores[0, 5] == 0


def test_covisitation_respects_mask():
    s = seqs([1, 1, 1], [1, 2, 3])
    cv = CoVisitation.fit(s, np.array([True, True, False]), 4, window=2)
    assert cv.graph[2, 3] == 0 and cv.graph[1, 2] > 0


def test_popularity_ranks_by_count_and_skips_padding():
    s = seqs([1, 1, 2, 2, 2], [3, 3, 3, 2, 0])
    pop = Popularity.fit(s, np.ones(5, bool), 4)
    assert pop.ranked.tolist() == [3, 2]
    assert pop.counts.tolist() == [0, 0, 1, 3]
