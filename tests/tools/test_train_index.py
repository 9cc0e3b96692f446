"""``train --index auto``: exact search for small catalogues, a gated IVF index above the threshold."""

import numpy as np

import funnel.tools.train as train_tool
from funnel.bundle import load_bundle
from funnel.events.split import make_split
from funnel.recall.index import IndexSpec
from funnel.recall.train import serving_user_vectors
from funnel.server.engine import Engine
from funnel.server.query import RecommendQuery


def _choose(bundle, spec="auto"):
    b = load_bundle(bundle)
    parts = make_split(b.data.seqs, "leave-last-out")
    return train_tool.choose_index(spec, b.two_tower, b.data, parts, b.item_vecs, b.recommendable, seed=0)


def test_small_catalogue_gets_exact_search(tiny_bundle):
    spec, why, built = _choose(tiny_bundle)
    assert spec == IndexSpec() and why["chosen"] == "flat" and why["items"] < train_tool.AUTO_IVF_MIN_ITEMS and built is None


def test_large_catalogue_gets_ivf_only_through_the_recall_gate(tiny_bundle, monkeypatch):
    monkeypatch.setattr(train_tool, "AUTO_IVF_MIN_ITEMS", 10)
    spec, why, built = _choose(tiny_bundle)
    tried = why["recall_at_k"]
    assert tried and all(name.startswith("ivf") and 0 <= r <= 1 for name, r in tried.items()) and why["users"] > 0
    # The index is kept with the fewest probed cells that pass, if any count tried passed.
    passed = [int(name.split("nprobe=")[1]) for name, r in tried.items() if r >= train_tool.MIN_GATE_RECALL]
    assert (spec.kind == "ivf") == bool(passed)
    assert not passed or spec.nprobe == min(passed)
    # An index that passed is handed back built, so training does not build it twice.
    assert (built is not None) == (spec.kind == "ivf")
    # A gate no index can pass keeps exact search.
    monkeypatch.setattr(train_tool, "MIN_GATE_RECALL", 1.01)
    spec, why, built = _choose(tiny_bundle)
    assert spec == IndexSpec() and why["chosen"] == "flat" and built is None


def test_an_explicit_spec_is_taken_as_given(tiny_bundle):
    spec, why, built = _choose(tiny_bundle, "hnsw:m=16")
    assert spec.kind == "hnsw" and spec.m == 16 and why is None and built is None


def test_the_gate_asks_with_the_vectors_the_server_queries_the_index_with(tiny_bundle):
    b = load_bundle(tiny_bundle)
    seqs = b.data.seqs
    users = np.flatnonzero(seqs.lengths > 0)[:6]
    engine = Engine.load(tiny_bundle, runtime="torch")
    served = []  # the vectors each request's recall asks the index with
    encode = engine.pipeline.retriever.user_vectors

    def recorded(window, now):
        served.append(encode(window, now))
        return served[-1]

    engine.pipeline.retriever.user_vectors = recorded
    for user in b.data.users.decode(users):
        engine.recommend(RecommendQuery(user_id=str(user), k=5))
    np.testing.assert_allclose(serving_user_vectors(b.two_tower, b.data, users), np.concatenate(served), atol=1e-5)
