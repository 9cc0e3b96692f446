import numpy as np
import pytest

from recall.index import IndexSpec, build_index, load_index, resolve, save_index, search
from recall.scoring import exact_topk


def clustered(n=4000, d=16, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = centres[rng.integers(0, clusters, 50)] + 0.3 * rng.standard_normal((50, d))
    return x.astype(np.float32), q.astype(np.float32)


def overlap(a, b):
    return np.mean([len(set(a[i]) & set(b[i])) / b.shape[1] for i in range(len(a))])


@pytest.mark.parametrize(
    "text,min_recall",
    [("flat", 1.0), ("ivf:nlist=32,nprobe=8", 0.9), ("ivfpq:nlist=32,m=8,nprobe=8", 0.5), ("hnsw:m=16,ef_search=64", 0.9)],
)
def test_factory_matches_exact_search_within_tolerance(text, min_recall):
    x, q = clustered()
    ids = np.arange(1, len(x) + 1)
    index = build_index(x, ids, IndexSpec.parse(text))
    got, scores = search(index, q, 20)
    vecs = np.vstack([np.zeros((1, x.shape[1]), np.float32), x])  # row 0 = padding id
    exact, exact_scores = exact_topk(q, vecs, 20)
    assert overlap(got, exact) >= min_recall
    if text == "flat":
        np.testing.assert_allclose(scores, exact_scores, rtol=1e-4, atol=1e-5)


def test_spec_parse_round_trip_and_errors():
    spec = IndexSpec.parse("ivf:nlist=64,nprobe=4")
    assert (spec.kind, spec.nlist, spec.nprobe) == ("ivf", 64, 4)
    assert IndexSpec.parse(str(spec)) == spec
    with pytest.raises(ValueError, match="unknown index kind"):
        IndexSpec.parse("lsh")
    with pytest.raises(ValueError, match="bad index option"):
        IndexSpec.parse("ivf:probes=3")
    with pytest.raises(ValueError, match="needs an integer"):
        IndexSpec.parse("ivf:nlist=many")
    assert resolve(IndexSpec.parse("ivf"), 10_000).nlist == 256


def test_save_and_load_keep_ids_and_search_params(tmp_path):
    x, q = clustered(n=500)
    spec = IndexSpec.parse("ivf:nlist=8,nprobe=8")
    index = build_index(x, np.arange(100, 600), spec)
    save_index(index, str(tmp_path / "i.faiss"))
    back = load_index(str(tmp_path / "i.faiss"), spec)
    a, _ = search(index, q, 5)
    b, _ = search(back, q, 5)
    assert (a == b).all() and a.min() >= 100
