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


def _reference(history: UserHistory, query: RecommendQuery, n: int) -> tuple:
    """One query's window, time, activity and exclusions the plain way: its whole merged sequence, then numpy."""
    data = history.data
    seq = history.sequence(query)
    window = seq.user_window(np.zeros(1, np.int64), n)
    now = max(history.data_end, int(seq.ts.max())) if len(seq) else history.data_end
    named = data.items.encode(list(query.exclude_item_ids)) if query.exclude_item_ids else np.zeros(0, np.int64)
    excluded = named if query.include_seen else np.concatenate([named, seq.items])
    return window, now, len(seq), np.unique(excluded[excluded > 0])


def test_assembled_batch_equals_each_query_merged_on_its_own(tiny_data):
    seqs = tiny_data.seqs
    history = UserHistory(tiny_data, None, data_end=int(seqs.ts.max()))
    busiest = int(np.argmax(seqs.lengths))
    lo = seqs.offsets[busiest]
    user = lambda u: str(tiny_data.users.decode([u])[0])
    item = lambda i: str(tiny_data.items.decode([i])[0])
    tie = int(seqs.ts[lo + 1])  # a newer event at the time of a bundle event goes after it
    queries = [
        RecommendQuery(user_id=user(busiest), k=5),
        RecommendQuery(user_id=user(busiest), k=5, recent_events=(Event(item(seqs.items[lo]), "buy", tie), Event("no-such-item", "pv", tie), Event(item(3), "cart", 1))),
        RecommendQuery(user_id="new-user", k=5, recent_events=(Event(item(5), "fav", 10**10), Event(item(4), "pv", 10**10))),
        RecommendQuery(user_id="nobody", k=5),
        RecommendQuery(user_id=user(2), k=5, exclude_item_ids=(item(7), "no-such-item", item(7))),
        RecommendQuery(user_id=user(3), k=5, include_seen=True, exclude_item_ids=(item(9),)),
    ]
    for n in (4, int(seqs.lengths.max()) + 3):
        got = history.assemble(queries, n)
        for row, query in enumerate(queries):
            window, now, activity, excluded = _reference(history, query, n)
            for name in ("items", "categories", "behaviors", "ts", "lengths"):
                np.testing.assert_array_equal(getattr(got.window, name)[row], getattr(window, name)[0], err_msg=f"{name}, query {row}")
            assert got.now[row] == now and got.activity[row] == activity
            keys = got.exclude.keys[(got.exclude.keys // got.exclude.width) == row] % got.exclude.width
            np.testing.assert_array_equal(keys, excluded)
        assert got.exclude.most_per_row == max(len(_reference(history, q, n)[3]) for q in queries)
        assert (np.diff(got.exclude.keys) > 0).all()
    assert got.users.tolist()[2:4] == [0, 0] and got.window.lengths[3] == 0 and got.now[2] == 10**10
