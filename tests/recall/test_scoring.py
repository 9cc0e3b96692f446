import numpy as np
import scipy.sparse as sp

import funnel.recall.scoring as scoring
from funnel.recall.scoring import exact_topk


def test_exact_topk_in_small_blocks_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(37, 8)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    exclude = sp.random(37, 50, density=0.2, format="csr", random_state=1)
    scores = users @ items.T
    scores[:, 0] = -np.inf
    scores[exclude.nonzero()] = -np.inf
    want = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    monkeypatch.setattr(scoring, "BLOCK_FLOATS", 3 * 50)  # three users per block
    ids, got = exact_topk(users, items, 5, exclude)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(got, np.take_along_axis(scores, want, axis=1), rtol=1e-5)
