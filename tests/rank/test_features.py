"""The built-in features' compiled pass equals the registered groups computed one by one."""

import numpy as np
import pytest

from funnel.bundle import load_bundle
from funnel.events.sequences import Window
from funnel.rank import features as F
from funnel.rank.schema import FeatureBatch, register_feature, unregister


@pytest.fixture(scope="module")
def tables(tiny_bundle):
    return load_bundle(tiny_bundle).pipeline().tables


def _batch(tables, now, length):
    # Three users: a full window, one with two events (shorter than the co-visitation look-back), none.
    rng = np.random.default_rng(0)
    m = len(tables.item_category)
    items = rng.integers(1, m, (3, length))
    items[1, : length - 2] = 0
    items[2] = 0
    real = items > 0
    window = Window(
        items,
        np.where(real, tables.item_category[items], 0),
        np.where(real, rng.integers(1, 5, items.shape), 0),
        np.where(real, now - rng.integers(0, 40 * 86_400, items.shape), 0),
        real.sum(1),
    )
    cands = np.concatenate([items[:, -4:], rng.integers(1, m, (3, 20)), np.full((3, 1), m + 5), np.zeros((3, 3), np.int64)], axis=1)  # seen, unseen, past the tables, padding
    cands[2, :4] = rng.integers(1, m, 4)
    cand_real = cands > 0
    scores = np.where(cand_real, rng.random(cands.shape), -np.inf).astype(np.float32)
    categories = tables.item_category[np.where(cands < m, cands, 0)]
    ranks = np.broadcast_to(np.arange(cands.shape[1]), cands.shape)
    times = np.full(3, now)
    return FeatureBatch(window, times, cands, scores, np.ones_like(cands), categories, ranks, cand_real, np.array([40, 2, 0]), tables)


@pytest.mark.parametrize("length", [3, 12])
def test_compiled_builtin_features_equal_the_registered_groups(tables, length):
    now = 1_512_000_000
    tables.business.fix_time(now)
    batch = _batch(tables, now, length)
    popularity = tables.business.fixed_popularity(batch.now)
    fused = F._builtin_dense(batch, popularity)
    general = F._registered_dense(batch)
    assert fused.dtype == general.dtype == np.float32 and fused.shape == general.shape == batch.cand_items.shape + (len(F.dense_names()),)
    np.testing.assert_array_equal(fused, general)
    assert (fused[batch.cand_items > 0] != 0).any(axis=0).sum() > len(F.dense_names()) // 2  # most columns carry numbers
    assert (fused[batch.cand_items == 0] == 0).all()


def test_build_features_takes_the_compiled_pass_only_for_builtin_features_at_the_fixed_time(tables, monkeypatch):
    now = 1_512_000_000
    tables.business.fix_time(now)
    batch = _batch(tables, now, 8)
    calls = []
    monkeypatch.setattr(F, "builtin_dense", lambda *a: calls.append(1) or F._registered_dense(batch))

    def build(at):
        return F.build_features(
            batch.window, np.full(3, at), batch.cand_items, batch.cand_scores, batch.cand_channels, batch.cand_ranks,
            user_activity=batch.user_activity, tables=tables, num_gap_buckets=24,
        )  # fmt: skip

    build(now)
    assert len(calls) == 1
    build(now + 1)  # another request time: popularity is counted, not read from the fixed table
    assert len(calls) == 1
    assert tables.business.fixed_popularity(np.array([now + 1])) is None
    extra = register_feature("test_parity", lambda b: b.cand_items % 2)
    try:
        assert build(now).dense.shape[-1] == len(F.dense_names())
        assert len(calls) == 1
    finally:
        unregister(extra)
