import numpy as np
import scipy.sparse as sp

from funnel.events.sequences import Sequences, Window
from funnel.recall.channels import CoVisitation, Popularity, recency_weights
from funnel.recall.lookup import sorted_lookup, top_per_row
from funnel.recall.plugin import ChannelQuery, Excluded


def seqs(users, items):
    n = len(users)
    return Sequences.from_encoded(np.array(users), np.array(items), np.ones(n, np.int64), np.ones(n, np.int8), np.arange(n), max(users) + 1)


def dense_scores(cov: CoVisitation, recent: np.ndarray) -> np.ndarray:
    """The channel's scores by definition: each recent item's graph row, weighted by recency, summed."""
    g = cov.graph.toarray()
    out = np.zeros((len(recent), g.shape[1]))
    for i, row in enumerate(recent):
        for p, src in enumerate(row):
            if 0 < src < g.shape[0]:
                out[i] += recency_weights(len(row))[p] * g[src]
    return out.astype(np.float32)


def random_covisitation(rng: np.random.Generator, n: int, *, events: int, users: int, neighbours: int) -> CoVisitation:
    """The channel fitted on random events over items 1..n-1."""
    s = Sequences.from_encoded(
        rng.integers(0, users, events), rng.integers(1, n, events), np.zeros(events, np.int64), np.ones(events, np.int64), np.arange(events), users
    )
    return CoVisitation.count_pairs(s, np.ones(events, bool), n, neighbours=neighbours)


def query(recent: np.ndarray, num_items: int, exclude=None, category=None, item_category=None) -> ChannelQuery:
    b = len(recent)
    window = Window(recent, np.zeros_like(recent), np.ones_like(recent), np.zeros_like(recent), (recent > 0).sum(1))
    excluded = Excluded(exclude if exclude is not None else [np.zeros(0, np.int64)] * b, width=num_items)
    cats = item_category if item_category is not None else np.zeros(num_items, np.int64)
    return ChannelQuery(window, np.zeros(b, np.int64), np.zeros((b, 2), np.float32), excluded, category, cats, recent.shape[1])


def test_top_per_row_orders_and_pads():
    m = sp.csr_matrix(np.array([[0, 3, 1, 2], [0, 0, 0, 0], [5, 0, 0, 0]], dtype=np.float32))
    cols, vals = top_per_row(m, 2)
    assert cols.tolist() == [[1, 3], [0, 0], [0, 0]]
    assert vals[0].tolist() == [3, 2] and np.isneginf(vals[1]).all() and vals[2, 0] == 5


def test_covisitation_links_neighbours_within_window_and_user():
    s = seqs([1, 1, 1, 2, 2], [1, 2, 3, 4, 5])
    cv = CoVisitation.count_pairs(s, np.ones(5, bool), 6, window=1, neighbours=5)
    g = cv.graph.toarray()
    assert g[1, 2] > 0 and g[2, 3] > 0 and g[4, 5] > 0
    assert g[1, 3] == 0  # two steps apart, window 1
    assert g[3, 4] == 0  # different users
    assert g[1, 2] > g[2, 1]  # forward pairs weigh more
    scores = dense_scores(cv, np.array([[0, 1]]))
    assert scores[0, 2] > 0 and scores[0, 5] == 0


def test_candidates_are_the_best_weighted_sums_of_the_recent_items_rows():
    s = seqs([1, 1, 1, 1, 2, 2], [1, 2, 3, 4, 5, 2])
    cv = CoVisitation.count_pairs(s, np.ones(6, bool), 7, window=2, neighbours=5)
    g = cv.graph.toarray()
    recent = np.array([[0, 2, 3], [1, 1, 9], [0, 0, 0]])  # 9 is beyond the graph (a new item)
    want = np.stack([0.5 * g[2] + g[3], 0.25 * g[1] + 0.5 * g[1], np.zeros(7)])
    np.testing.assert_allclose(dense_scores(cv, recent), want, rtol=1e-6)
    got = cv.candidates(query(recent, 7), 7)
    for row, scores in zip(got, want):
        linked = np.flatnonzero(scores > 0)
        best_first = linked[np.argsort(-scores[linked], kind="stable")]  # ties: the smaller id
        assert row.tolist() == best_first.tolist() + [0] * (7 - len(linked))


def test_candidates_skip_excluded_items_and_other_categories():
    rng = np.random.default_rng(1)
    n = 30
    cv = random_covisitation(rng, n, events=400, users=5, neighbours=10)
    recent = rng.integers(0, n, (4, 3))
    item_category = rng.integers(1, 3, n)
    exclude = [rng.choice(np.arange(1, n), 5, replace=False) for _ in range(4)]
    got = cv.candidates(query(recent, n, exclude, 2, item_category), 6)
    scores = dense_scores(cv, recent)
    for i, row in enumerate(got):
        ok = (scores[i] > 0) & (item_category == 2) & ~np.isin(np.arange(n), exclude[i])
        linked = np.flatnonzero(ok)
        want = linked[np.argsort(-scores[i, linked], kind="stable")][:6]
        assert row.tolist() == want.tolist() + [0] * (6 - len(want))


def test_allowed_keeps_order_and_drops_padding_excluded_and_other_categories():
    item_category = np.array([0, 1, 1, 2, 1, 2, 1])
    ids = np.array([[4, 0, 1, 3, 6, 2], [2, 2, 5, 1, 0, 0]])
    q = query(np.zeros((2, 1), np.int64), 7, exclude=[np.array([1]), np.array([5, 6])])
    assert q.allowed(ids, 3).tolist() == [[4, 3, 6], [2, 2, 1]]
    q = query(np.zeros((2, 1), np.int64), 7, exclude=[np.array([1]), np.array([5, 6])], category=1, item_category=item_category)
    assert q.allowed(ids, 9).tolist() == [[4, 6, 2, 0, 0, 0], [2, 2, 1, 0, 0, 0]]


def test_covisitation_respects_mask():
    s = seqs([1, 1, 1], [1, 2, 3])
    cv = CoVisitation.count_pairs(s, np.array([True, True, False]), 4, window=2)
    assert cv.graph[2, 3] == 0 and cv.graph[1, 2] > 0


def test_popularity_ranks_by_count_and_skips_padding():
    s = seqs([1, 1, 2, 2, 2], [3, 3, 3, 2, 0])
    pop = Popularity.count_items(s, np.ones(5, bool), 4)
    assert pop.ranked.tolist() == [3, 2]
    assert pop.counts.tolist() == [0, 0, 1, 3]


def test_pair_scores_equal_the_channel_scores_at_the_given_items():
    rng = np.random.default_rng(0)
    n = 40
    cov = random_covisitation(rng, n, events=600, users=6, neighbours=8)
    recent = rng.integers(0, n, (5, 4))
    recent[0, :2] = recent[0, 2]  # the same item twice adds up
    recent[1] = 0  # no history at all
    recent[2, 0] = n + 3  # an id beyond the graph (a new item) links nothing
    items = rng.integers(0, n + 5, (5, 30))
    items[:, -1] = 0
    # The channel's dense scores for these recent items, read at ``items`` (0 where an item is padding or new).
    at_items = lambda r: np.where((items > 0) & (items < n), np.take_along_axis(dense_scores(cov, r), np.minimum(items, n - 1), axis=1), 0.0)
    got = cov.pair_scores(recent, items)
    assert got.shape == (5, 30, 4)
    np.testing.assert_allclose(got @ recency_weights(4), at_items(recent), rtol=1e-6)
    for j in range(4):  # each recent item's own link
        np.testing.assert_allclose(got[..., j], at_items(recent[:, j : j + 1]), rtol=1e-6)
    assert (got[0] > 0).any() and (got[1] == 0).all()


def test_sorted_lookup_finds_present_keys_only():
    keys = np.array([2, 5, 9])
    at, found = sorted_lookup(keys, np.array([[5, 1], [9, 12]]))
    assert found.tolist() == [[True, False], [True, False]]
    assert keys[at[found]].tolist() == [5, 9]


def reference_graph(s: Sequences, mask: np.ndarray, num_items: int, window: int) -> np.ndarray:
    """The co-visitation weights before truncation, counted pair by pair in plain Python."""
    g = np.zeros((num_items, num_items))
    for u in range(s.num_users):
        lo, hi = s.offsets[u], s.offsets[u + 1]
        for a in range(lo, hi):
            for d in range(1, window + 1):
                b = a + d
                if b < hi and mask[a] and mask[b] and s.items[a] != s.items[b]:
                    g[s.items[a], s.items[b]] += 1.0 / d
                    g[s.items[b], s.items[a]] += 0.5 / d
    return g / np.sqrt(np.maximum(g.sum(0), 1.0))


def test_sharded_counting_matches_the_pairwise_reference():
    rng = np.random.default_rng(3)
    n, items = 500, 30
    s = Sequences.from_encoded(rng.integers(0, 12, n), rng.integers(1, items, n), np.zeros(n, np.int64), np.ones(n, np.int64), rng.integers(0, 1000, n), 12)
    mask = rng.random(n) < 0.9
    want = reference_graph(s, mask, items, window=3)
    for shard_entries in (10**9, 97):  # one shard, and about 25
        full = CoVisitation.count_pairs(s, mask, items, neighbours=items, shard_entries=shard_entries).graph.toarray()
        np.testing.assert_allclose(full, want, rtol=1e-5)
        top = CoVisitation.count_pairs(s, mask, items, neighbours=4, shard_entries=shard_entries).graph.toarray()
        # Each row keeps its 4 largest weights (which of tied items is kept may differ).
        np.testing.assert_allclose(-np.sort(-top, axis=1)[:, :4], -np.sort(-want, axis=1)[:, :4], rtol=1e-5)
        assert ((top > 0).sum(1) <= 4).all()


def test_covisitation_of_a_log_without_pairs_is_empty():
    s = seqs([0, 1, 2], [1, 2, 3])
    assert CoVisitation.count_pairs(s, np.ones(3, bool), 4).graph.nnz == 0


def test_register_channel_refuses_incomplete_taken_and_reserved_names():
    import pytest

    from funnel.recall.plugin import register_channel, registered

    class Half:
        name, default_count = "half", 5

        @classmethod
        def fit(cls, data, mask):
            return cls()

    with pytest.raises(ValueError, match="Half is not a recall channel: it lacks candidates, save, load"):
        register_channel(Half)
    for taken in ("covisit", "two_tower", "recent"):
        Half.name = taken
        Half.candidates = Half.save = Half.load = lambda *a: None
        with pytest.raises(ValueError, match=f"{taken!r} is taken or reserved"):
            register_channel(Half)
    assert list(registered()) == ["covisit", "popular"]
