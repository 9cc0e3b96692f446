"""Explanations by leave-one-out effects: the batched computation matches re-ranking without the event, and a deletion test."""

import numpy as np
import pytest

from funnel.bundle import load_bundle
from funnel.events.sequences import Window


@pytest.fixture(scope="module")
def explained(tiny_bundle):
    """The tiny bundle's pipeline, every user with some history as of their last event, ranked and explained for the top 2."""
    b = load_bundle(tiny_bundle)
    pipe = b.pipeline("onnx")
    seqs = b.data.seqs
    users = np.flatnonzero(seqs.lengths >= 5)
    window = seqs.user_window(users, pipe.history)
    now = seqs.ts[seqs.offsets[users + 1] - 1]
    activity = seqs.lengths[users]
    out = pipe.recommend(window, now, activity, seqs.history_matrix(users, seqs.offsets[users + 1], b.data.items.size))
    effects = pipe.event_effects(window, now, activity, out.ranked, k=2)  # [U, 2, L]
    return pipe, window, now, activity, out, effects


def without(window: Window, rows: np.ndarray, cols: np.ndarray) -> Window:
    """``window``'s rows with the event at ``cols`` removed: earlier events move up one place, padding in front."""
    drop = lambda a: np.stack([np.concatenate([[0], np.delete(a[r], c)]) for r, c in zip(rows, cols)])
    return Window(drop(window.items), drop(window.categories), drop(window.behaviors), drop(window.ts), window.lengths[rows] - 1)


def rescored(pipe, window, now, activity, candidates, rows, cols, items) -> np.ndarray:
    """Final score of ``items[i]`` when row ``rows[i]`` is ranked again (same candidates) without its event ``cols[i]``."""
    take = lambda a: a[rows]
    cands = type(candidates)(**{f: take(getattr(candidates, f)) for f in candidates.__dataclass_fields__})
    ranked = pipe.rank(without(window, rows, cols), now[rows], activity[rows] - 1, cands)
    return np.array([ranked.scores[i, ranked.items[i] == item][0] for i, item in enumerate(items)])


def test_effects_equal_the_score_lost_when_the_event_is_removed(explained):
    pipe, window, now, activity, out, effects = explained
    w = window.tail(pipe.ranker.cfg.history)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(w.items), 12, replace=False)
    cols = np.array([rng.choice(np.flatnonzero(w.items[r] > 0)) for r in rows])
    items = out.ranked.items[rows, 0]
    after = rescored(pipe, w, now, activity, out.candidates, rows, cols, items)
    np.testing.assert_allclose(out.ranked.scores[rows, 0] - after, effects[rows, 0, cols], atol=1e-5)
    assert (effects[w.items[:, None, :].repeat(2, 1) == 0] == 0).all()  # padding events explain nothing


def test_deletion_the_top_explained_event_lowers_the_score_more_than_a_random_one(explained):
    pipe, window, now, activity, out, effects = explained
    w = window.tail(pipe.ranker.cfg.history)
    rows, slot = np.divmod(np.arange(len(w.items) * 2), 2)  # every user's top two items
    assert len(rows) >= 200
    rng = np.random.default_rng(1)
    top = effects[rows, slot].argmax(axis=1)
    rand = np.array([rng.choice(np.flatnonzero(w.items[r] > 0)) for r in rows])
    items = out.ranked.items[rows, slot]
    base = out.ranked.scores[rows, slot]
    drop_top = base - rescored(pipe, w, now, activity, out.candidates, rows, top, items)
    drop_rand = base - rescored(pipe, w, now, activity, out.candidates, rows, rand, items)
    print(f"deletion over {len(rows)} (user, item) pairs: mean score drop {drop_top.mean():.4f} without the top explained event, "
          f"{drop_rand.mean():.4f} without a random one; top > random in {(drop_top > drop_rand).mean():.1%}")
    assert drop_top.mean() > 0 and drop_top.mean() > 3 * max(drop_rand.mean(), 0) + 1e-4
    assert (drop_top >= drop_rand - 1e-5).mean() > 0.95
