import faiss
import numpy as np
import pytest

from funnel.recall.index import IndexSpec, add_items, auto_nprobe, build_index, load_index, resolve, save_index, search, tune_nprobe
from funnel.recall.scoring import exact_topk


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
    [
        ("flat", 1.0),
        ("ivf:nlist=32,nprobe=8", 0.9),
        ("ivf:nlist=32,nprobe=8,codes=f32", 0.9),
        ("ivf:nlist=32,nprobe=8,codes=sq8", 0.9),
        ("ivfpq:nlist=32,m=8,nprobe=8", 0.5),
        ("hnsw:m=16,ef_search=64", 0.9),
    ],
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
    if text.startswith("ivf:"):
        # Each returned score is the item's inner product, to the precision its codes keep.
        true = np.einsum("qd,qkd->qk", q, vecs[got])  # [q, 20]
        tolerance = {"f32": 1e-5, "f16": 2e-3, "sq8": 5e-2}[IndexSpec.parse(text).codes]
        np.testing.assert_allclose(scores, true, atol=tolerance)


@pytest.mark.parametrize("text,stored", [("ivf:nlist=8", faiss.ScalarQuantizer.QT_fp16), ("ivf:nlist=8,codes=sq8", faiss.ScalarQuantizer.QT_8bit), ("ivf:nlist=8,codes=f32", None)])
def test_ivf_stores_half_floats_unless_codes_says_otherwise(text, stored):
    x, _ = clustered(n=500)
    index = faiss.downcast_index(build_index(x, np.arange(500), IndexSpec.parse(text)))
    if stored is None:
        assert isinstance(index, faiss.IndexIVFFlat)
    else:
        assert isinstance(index, faiss.IndexIVFScalarQuantizer) and index.sq.qtype == stored


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
    with pytest.raises(ValueError, match="codes must be one of f16, f32, sq8"):
        IndexSpec.parse("ivf:codes=f8")
    sq8 = IndexSpec.parse("ivf:nlist=64,codes=sq8")
    assert sq8.codes == "sq8" and IndexSpec.parse(str(sq8)) == sq8 and str(IndexSpec.parse("ivf")) == "ivf"
    assert resolve(IndexSpec.parse("ivf"), 10_000).nlist == 256


def test_auto_ivf_settings_scale_with_the_catalogue():
    small, big = resolve(IndexSpec.parse("ivf"), 10_000), resolve(IndexSpec.parse("ivf"), 1_000_000)
    assert small.nprobe == auto_nprobe(small.nlist) <= small.nlist
    assert big.nlist > small.nlist and big.nprobe == auto_nprobe(big.nlist) > small.nprobe
    assert resolve(IndexSpec.parse("ivf:nlist=8,nprobe=64"), 1000).nprobe == 8


def test_auto_nprobe_is_applied_to_a_loaded_index(tmp_path):
    x, _ = clustered(n=2000)
    index = build_index(x, np.arange(len(x)), IndexSpec.parse("ivf:nlist=64"))
    save_index(index, str(tmp_path / "i.faiss"))
    back = load_index(str(tmp_path / "i.faiss"), IndexSpec.parse("ivf"))
    assert faiss.extract_index_ivf(back).nprobe == auto_nprobe(64) > 0


def test_save_and_load_keep_ids_and_search_params(tmp_path):
    x, q = clustered(n=500)
    spec = IndexSpec.parse("ivf:nlist=8,nprobe=8")
    index = build_index(x, np.arange(100, 600), spec)
    save_index(index, str(tmp_path / "i.faiss"))
    back = load_index(str(tmp_path / "i.faiss"), spec)
    a, _ = search(index, q, 5)
    b, _ = search(back, q, 5)
    assert (a == b).all() and a.min() >= 100


@pytest.mark.parametrize("text,min_found", [("flat", 1.0), ("ivf:nlist=32,nprobe=2", 0.95), ("ivfpq:nlist=32,m=8,nprobe=2", 0.8), ("hnsw:m=16,ef_search=64", 0.95)])
def test_add_items_makes_new_ids_searchable_by_their_own_vectors(text, min_found):
    x, _ = clustered(n=3000)
    old, new = x[:2500], x[2500:]
    index = build_index(old, np.arange(1, 2501), IndexSpec.parse(text))
    add_items(index, new, np.arange(2501, 3001))
    got, _ = search(index, new, 10)
    assert index.ntotal == 3000
    assert (got == np.arange(2501, 3001)[:, None]).any(axis=1).mean() >= min_found


@pytest.mark.parametrize("text", ["flat", "ivf:nlist=32,nprobe=32"])
def test_add_items_replaces_stored_vectors_where_the_index_can_remove(text):
    x, q = clustered(n=1000)
    index = build_index(x, np.arange(1, 1001), IndexSpec.parse(text))
    with pytest.raises(ValueError, match="already in the index"):
        add_items(index, q[:2], np.array([5, 1234]))
    add_items(index, q[:2], np.array([5, 6]), replace=True)
    got, _ = search(index, q[:2], 1)
    assert index.ntotal == 1000 and got[:, 0].tolist() == [5, 6]
    old, _ = search(index, x[4:6], 1)
    assert not np.isin(old[:, 0], [5, 6]).any()  # the old vectors are gone


def test_add_items_refuses_replacement_on_hnsw_and_bad_input():
    x, q = clustered(n=500)
    index = build_index(x, np.arange(500), IndexSpec.parse("hnsw:m=8"))
    with pytest.raises(NotImplementedError, match="cannot remove vectors"):
        add_items(index, q[:1], np.array([3]), replace=True)
    with pytest.raises(ValueError, match="repeat"):
        add_items(index, q[:2], np.array([900, 900]))
    with pytest.raises(ValueError, match="expected vectors"):
        add_items(index, q[:2, :4], np.array([900, 901]))
    assert index.ntotal == 500


def test_tune_nprobe_finds_the_fewest_cells_that_pass_or_stops_at_a_quarter():
    x, q = clustered()
    vecs = np.vstack([np.zeros((1, x.shape[1]), np.float32), x])
    among = np.ones(len(vecs), bool)
    among[0] = False
    spec = IndexSpec.parse("ivf:nlist=64,nprobe=1")
    index = build_index(x, np.arange(1, len(x) + 1), spec)
    by_nprobe = lambda tried: {int(s.split("nprobe=")[1]): r for s, r in tried.items()}
    for min_recall in (0.5, 0.9):
        chosen, tried = tune_nprobe(index, spec, q, vecs, among, 20, min_recall=min_recall)
        recalls = by_nprobe(tried)
        assert recalls[chosen.nprobe] >= min_recall and index.nprobe == chosen.nprobe
        assert all(r < min_recall for n, r in recalls.items() if n < chosen.nprobe)
        assert chosen.nprobe == 1 or chosen.nprobe - 1 in recalls  # one cell fewer was tried and fell short: the fewest
    hard, tried = tune_nprobe(index, spec, q, vecs, among, 20, min_recall=1.01)  # never passes: stops at 16 of 64 cells
    assert list(by_nprobe(tried)) == [1, 2, 4, 8, 16] and hard.nprobe == 16
