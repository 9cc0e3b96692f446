"""ONNX Runtime and PyTorch score a bundle alike: the user tower and the ranker on real inputs, within 1e-4."""

import numpy as np
import pytest

from funnel.bundle import load_bundle
from funnel.server.engine import Engine
from funnel.server.query import RecommendQuery

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pipes(tiny_bundle):
    b = load_bundle(tiny_bundle)
    return b, b.pipeline("onnx"), b.pipeline("torch")


def _real_inputs(b, pipe, n_users: int = 16):
    """The bundle's own users: their windows as of the bundle's end, and their recall candidates."""
    seqs = b.data.seqs
    users = np.flatnonzero(seqs.lengths > 0)[:n_users]
    window = seqs.user_window(users, pipe.history)
    now = np.full(len(users), b.data_end)
    exclude = seqs.history_matrix(users, seqs.offsets[users + 1], b.data.items.size)
    candidates = pipe.retriever.retrieve(window.tail(pipe.retriever.model.cfg.history), now, exclude)
    return users, window, now, candidates


def test_user_vectors_agree(pipes):
    b, onnx, torch_ = pipes
    _, window, now, _ = _real_inputs(b, onnx)
    w = window.tail(onnx.retriever.model.cfg.history)
    got, want = onnx.retriever.user_vectors(w, now), torch_.retriever.user_vectors(w, now)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=TOLERANCE)
    # Batch size and history length are dynamic in the export.
    np.testing.assert_allclose(onnx.retriever.user_vectors(w.tail(20), now)[:3], torch_.retriever.user_vectors(w.tail(20), now)[:3], atol=TOLERANCE)


def test_ranker_outputs_agree_on_recalled_candidates(pipes):
    b, onnx, torch_ = pipes
    users, window, now, candidates = _real_inputs(b, onnx)
    w = window.tail(onnx.ranker.cfg.history)
    feats = onnx.features(w, now, b.data.seqs.lengths[users], candidates)
    assert feats.cand_items.shape[1] > 50
    (logits, att), (logits_t, att_t) = onnx._score(feats, True), torch_._score(feats, True)
    np.testing.assert_allclose(logits, logits_t, atol=TOLERANCE)
    np.testing.assert_allclose(att, att_t, atol=TOLERANCE)
    # Without attention the ONNX path runs the logits' part of the graph alone: the same logits.
    alone, none = onnx._score(feats, False)
    assert none is None
    np.testing.assert_array_equal(alone, logits)
    # A single user with a handful of candidates: other batch and candidate sizes than the export's example.
    one = feats.take(np.array([0]))
    one.cand_items, one.cand_categories, one.cand_channels, one.dense = (a[:, :7] for a in (one.cand_items, one.cand_categories, one.cand_channels, one.dense))
    np.testing.assert_allclose(onnx._score(one, False)[0], torch_._score(one, False)[0], atol=TOLERANCE)


def test_engines_recommend_the_same_items(tiny_bundle):
    engines = {runtime: Engine.load(tiny_bundle, runtime=runtime) for runtime in ("onnx", "torch")}
    users = engines["onnx"].bundle.data.users.decode(np.arange(1, 9))
    for user in users:
        got = {rt: e.recommend(RecommendQuery(user_id=str(user), k=10)) for rt, e in engines.items()}
        assert [r.item_id for r in got["onnx"].items] == [r.item_id for r in got["torch"].items]
        np.testing.assert_allclose([r.score for r in got["onnx"].items], [r.score for r in got["torch"].items], atol=TOLERANCE)


def test_unknown_runtime_is_refused(tiny_bundle):
    with pytest.raises(ValueError, match="runtime must be one of onnx, torch"):
        load_bundle(tiny_bundle).pipeline("tensorrt")
