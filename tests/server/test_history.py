import numpy as np

from funnel.events.sequences import Sequences
from funnel.server.history import UserHistory
from funnel.server.query import Event, RecommendQuery


def _laid_out(seqs: Sequences) -> tuple:
    return tuple(np.asarray(getattr(seqs, f)) for f in ("offsets", "items", "categories", "behaviors", "ts"))


def test_a_user_with_nothing_newer_gets_the_bundle_slice_as_it_would_be_merged(tiny_data):
    history = UserHistory(tiny_data, None)
    seqs = tiny_data.seqs
    user = int(np.argmax(seqs.lengths))
    lo, hi = seqs.offsets[user], seqs.offsets[user + 1]
    got = history.sequence(RecommendQuery(user_id=str(tiny_data.users.decode([user])[0]), k=5))
    merged = Sequences.from_encoded(np.zeros(hi - lo, np.int64), seqs.items[lo:hi], seqs.categories[lo:hi], seqs.behaviors[lo:hi], seqs.ts[lo:hi], 1)
    for a, b in zip(_laid_out(got), _laid_out(merged)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert np.shares_memory(got.items, seqs.items)  # the bundle's arrays, not copies


def test_recent_events_merge_into_the_bundle_history_in_time_order(tiny_data):
    history = UserHistory(tiny_data, None)
    seqs = tiny_data.seqs
    user = int(np.argmax(seqs.lengths))
    lo, hi = seqs.offsets[user], seqs.offsets[user + 1]
    item = str(tiny_data.items.decode([seqs.items[lo]])[0])
    middle = int(seqs.ts[lo:hi][len(seqs.ts[lo:hi]) // 2])
    got = history.sequence(RecommendQuery(user_id=str(tiny_data.users.decode([user])[0]), k=5, recent_events=(Event(item, "buy", middle),)))
    assert len(got) == hi - lo + 1 and (np.diff(got.ts) >= 0).all()
    at = np.searchsorted(seqs.ts[lo:hi], middle, side="right")  # after the bundle's events of the same second
    np.testing.assert_array_equal(got.items, np.insert(seqs.items[lo:hi], at, seqs.items[lo]))
    assert not np.shares_memory(got.items, seqs.items)
