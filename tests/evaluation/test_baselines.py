import numpy as np
import pytest
import scipy.sparse as sp

from funnel.evaluation.baselines import itemknn_similarity, itemknn_topk, popularity_topk, topk_excluding

# 4 users × 5 items, interaction counts. Column sums: [3, 6, 1, 4, 0].
TRAIN = np.array(
    [
        [1, 2, 0, 0, 0],
        [0, 3, 0, 1, 0],
        [2, 1, 0, 0, 0],
        [0, 0, 1, 3, 0],
    ]
)


def brute_similarity(train: np.ndarray, neighbours: int, shrink: float) -> np.ndarray:
    """Dense cosine over the binarised matrix, zero diagonal, top ``neighbours`` per column (ties: lower id)."""
    x = (train != 0).astype(np.float64)
    co = x.T @ x
    norms = np.sqrt(x.sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(co > 0, co / (np.outer(norms, norms) + shrink), 0.0)
    np.fill_diagonal(sim, 0.0)
    out = np.zeros_like(sim)
    for j in range(sim.shape[1]):
        col = sim[:, j]
        keep = [i for i in sorted(range(len(col)), key=lambda i: (-col[i], i)) if col[i] > 0][:neighbours]
        out[keep, j] = col[keep]
    return out


def brute_scores(history: np.ndarray, train: np.ndarray, neighbours: int, shrink: float) -> np.ndarray:
    h = (history != 0).astype(np.float64)
    scores = h @ brute_similarity(train, neighbours, shrink)
    return np.where((h == 0) & (scores > 0), scores, -np.inf)


def random_binary(rng, users, items, density):
    return (rng.random((users, items)) < density).astype(np.int64) * rng.integers(1, 4, (users, items))


def test_popularity_orders_by_count_and_masks_history():
    m = sp.csr_matrix(TRAIN)
    top = popularity_topk(m, m, 3, np.array([0, 1, 2, 3]))
    # popularity order 1 (6), 3 (4), 0 (3), 2 (1); item 4 never seen, so never recommended.
    assert top.tolist() == [
        [3, 2, -1],  # user 0 saw 0, 1
        [0, 2, -1],  # user 1 saw 1, 3
        [3, 2, -1],  # user 2 saw 0, 1
        [1, 0, -1],  # user 3 saw 2, 3
    ]


def test_popularity_uses_history_rows_for_users_subset():
    train = sp.csr_matrix(TRAIN)
    history = sp.csr_matrix(np.array([[0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]))
    top = popularity_topk(history, train, 2, np.array([1, 0]))
    assert top.tolist() == [[3, 0], [1, 3]]
    with pytest.raises(ValueError):
        popularity_topk(history, train, 0, np.array([0]))


def test_topk_excluding_orders_masks_and_pads():
    scores = np.array([[0.5, 0.9, 0.5, -np.inf], [1.0, 2.0, 3.0, 4.0]])
    exclude = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 1]]))
    top = topk_excluding(scores, exclude, 4)
    assert top.tolist() == [[0, 2, -1, -1], [2, 1, 0, -1]]  # tie at 0.5 broken by lower id


@pytest.mark.parametrize("shrink", [0.0, 2.0])
def test_itemknn_matches_dense_brute_force(shrink):
    rng = np.random.default_rng(3)
    train = random_binary(rng, 30, 12, 0.3)
    history = random_binary(rng, 10, 12, 0.25)
    k = 5
    top = itemknn_topk(sp.csr_matrix(history), sp.csr_matrix(train), k, np.arange(10), shrink=shrink, batch=4)
    expected = brute_scores(history, train, neighbours=100, shrink=shrink)
    for u in range(10):
        best = np.sort(expected[u])[::-1][:k]
        n_valid = int(np.isfinite(best).sum())
        assert (top[u, n_valid:] == -1).all()
        ids = top[u, :n_valid]
        assert len(set(ids.tolist())) == n_valid
        assert (history[u, ids] == 0).all()  # own history is masked
        np.testing.assert_allclose(expected[u, ids], best[:n_valid], rtol=1e-5)


def test_itemknn_masks_history_and_drops_unrelated_items():
    # items 0 and 1 co-occur; item 2 is never seen with them.
    train = sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]]))
    history = sp.csr_matrix(np.array([[1, 0, 0]]))
    assert itemknn_topk(history, train, 3, np.array([0])).tolist() == [[1, -1, -1]]


def test_neighbour_truncation_keeps_top_one_per_item():
    rng = np.random.default_rng(5)
    train = random_binary(rng, 25, 9, 0.35)
    sim = itemknn_similarity(sp.csr_matrix(train), neighbours=1, batch=2)
    assert (np.diff(sim.tocsc().indptr) <= 1).all()
    np.testing.assert_allclose(sim.toarray(), brute_similarity(train, 1, 0.0), rtol=1e-6)

    history = random_binary(rng, 6, 9, 0.3)
    top = itemknn_topk(sp.csr_matrix(history), sp.csr_matrix(train), 4, np.arange(6), neighbours=1, batch=2)
    expected = brute_scores(history, train, neighbours=1, shrink=0.0)
    for u in range(6):
        best = np.sort(expected[u])[::-1][:4]
        n_valid = int(np.isfinite(best).sum())
        assert (top[u, n_valid:] == -1).all()
        np.testing.assert_allclose(expected[u, top[u, :n_valid]], best[:n_valid], rtol=1e-5)
