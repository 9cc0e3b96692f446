"""User state: in-memory state, the durable event store, replay, folding into training, and the engine reading it."""

import os
import sqlite3
import threading

import numpy as np
import pandas as pd
import pytest

from funnel.events.eventlog import EventStore, EventStoreError, UserEvent, _Pending, fold_events, read_event_store
from funnel.events.readers import EventLog, ReadReport
from funnel.events.schema import BEHAVIOR_CODE, BEHAVIORS
from funnel.server.engine import Engine
from funnel.server.query import Event, RecommendQuery
from funnel.server.state import MemoryState, SharedLogState, StateUnavailable, open_state


def ev(user: str, item: str, ts: int, behavior: str = "pv", category: str = "c") -> UserEvent:
    return UserEvent(user, item, category, behavior, ts)


def test_memory_state_keeps_time_order_and_bound():
    state = MemoryState(max_events_per_user=3)
    state.append([ev("u", "a", 10), ev("v", "x", 5)])
    state.append([ev("u", "b", 30), ev("u", "c", 20)])
    assert [e.item_id for e in state.recent("u")] == ["a", "c", "b"]
    state.append([ev("u", "d", 15)])
    # Bound 3 keeps the three most recent by time, oldest first.
    assert [e.item_id for e in state.recent("u")] == ["d", "c", "b"]
    assert [e.item_id for e in state.recent("v")] == ["x"]
    assert state.recent("nobody") == ()
    assert state.stats() == {"users": 2, "events": 4}


def test_memory_state_concurrent_appends_lose_nothing():
    state = MemoryState(max_events_per_user=10_000)
    threads = [threading.Thread(target=lambda t=t: [state.append([ev(f"u{i % 3}", f"{t}-{i}", i)]) for i in range(300)]) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state.stats()["events"] == 1200
    assert all(np.all(np.diff([e.timestamp for e in state.recent(f"u{k}")]) >= 0) for k in range(3))


def test_memory_state_rejects_zero_bound():
    with pytest.raises(ValueError, match="max_events_per_user"):
        MemoryState(0)


def test_event_store_appends_durably_and_replays_in_order(tmp_path):
    path = str(tmp_path / "sub" / "events.db")
    store = EventStore(path)
    store.append([ev("u", "a", 1), ev("v", "b", 2, "buy", "")])
    store.append([ev("u", "c", 3)])
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = EventStore(path)
    assert again.count() == 3
    assert [e for batch in again.batches(size=2) for e in batch] == [ev("u", "a", 1), ev("v", "b", 2, "buy", ""), ev("u", "c", 3)]


def test_event_store_batch_is_all_or_nothing(tmp_path):
    store = EventStore(str(tmp_path / "events.db"))
    store.append([ev("u", "a", 1)])
    with pytest.raises(Exception):
        store.append([ev("u", "b", 2), UserEvent("u", None, "c", "pv", 3)])  # NOT NULL item_id fails mid-batch
    assert store.count() == 1


def test_event_store_group_commit_keeps_every_concurrent_batch(tmp_path):
    store = EventStore(str(tmp_path / "events.db"))
    threads = [threading.Thread(target=lambda t=t: [store.append([ev(f"u{t}", f"i{n}", n), ev(f"u{t}", f"j{n}", n)]) for n in range(50)]) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = [e for batch in store.batches() for e in batch]
    assert len(stored) == 8 * 50 * 2
    for t in range(8):
        mine = [e.item_id for e in stored if e.user_id == f"u{t}"]
        assert mine == [x for n in range(50) for x in (f"i{n}", f"j{n}")]  # each caller's order, batches unbroken


def test_event_store_failed_batch_in_a_group_spares_the_others(tmp_path):
    store = EventStore(str(tmp_path / "events.db"))
    good, bad, later = _Pending([("u", "a", "c", "pv", 1)]), _Pending([("u", "b", "c", "pv", 2), ("u", None, "c", "pv", 3)]), _Pending([("u", "d", "c", "pv", 4)])
    store._commit([good, bad, later])
    assert good.done and bad.done and later.done
    assert (good.error, later.error) == (None, None) and isinstance(bad.error, sqlite3.IntegrityError)
    assert [e.item_id for batch in store.batches() for e in batch] == ["a", "d"]


def test_event_store_refuses_other_files(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(EventStoreError, match="junk.db"):
        EventStore(str(junk))
    future = tmp_path / "future.db"
    with sqlite3.connect(future) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(EventStoreError, match="format 99"):
        EventStore(str(future))
    with pytest.raises(FileNotFoundError):
        read_event_store(str(tmp_path / "missing.db"))


def test_open_state_replays_the_log(tmp_path):
    path = str(tmp_path / "events.db")
    first = open_state("memory", event_log=path)
    first.append([ev("u", "a", 1), ev("u", "b", 2)])
    first.close()
    second = open_state("memory", event_log=path, max_events_per_user=1)
    assert isinstance(second, SharedLogState)
    assert [e.item_id for e in second.recent("u")] == ["b"]
    assert second.store.count() == 2
    with pytest.raises(ValueError, match="unknown state"):
        open_state("postgres://x")


def test_states_sharing_an_event_log_see_each_others_events(tmp_path):
    # Two server processes' states on one file: what one commits, the other's next lookup returns.
    path = str(tmp_path / "events.db")
    a, b = open_state("memory", event_log=path), open_state("memory", event_log=path)
    a.append([ev("u", "x", 1)])
    assert [e.item_id for e in b.recent("u")] == ["x"]
    b.append([ev("u", "y", 2), ev("v", "z", 3)])
    assert [e.item_id for e in a.recent("u")] == ["x", "y"] and [e.item_id for e in a.recent("v")] == ["z"]
    assert [e.item_id for e in b.recent("u")] == ["x", "y"]  # its own append is held once, not twice
    a.close()
    b.close()
    # An unreadable store is the state being unavailable (Recommend then serves without live behaviour).
    with pytest.raises(StateUnavailable, match="cannot be read"):
        a.recent("u")


def test_the_commit_mark_spares_the_query_until_another_store_commits(tmp_path, monkeypatch):
    path = str(tmp_path / "events.db")
    writer, reader = EventStore(path), EventStore(path)
    writer.append([ev("u", "x", 1), ev("u", "y", 2)])
    last, _ = reader.since(0)
    assert last == 2 and reader.committed_after(1) and not reader.committed_after(2)
    state = SharedLogState(reader)
    queries = []
    since = reader.since
    monkeypatch.setattr(reader, "since", lambda *a: queries.append(a) or since(*a))
    for _ in range(3):
        assert [e.item_id for e in state.recent("u")] == ["x", "y"]
    assert queries == []  # nothing new: no SQLite read
    writer.append([ev("u", "z", 3)])
    assert [e.item_id for e in state.recent("u")] == ["x", "y", "z"] and queries == [(2,)]  # one read: the new batch
    writer.close()
    state.close()


def test_a_store_without_its_mark_is_replayed_and_a_stale_mark_costs_only_queries(tmp_path):
    path = str(tmp_path / "events.db")
    store = EventStore(path)
    store.append([ev("u", "x", 1), ev("u", "y", 2), ev("u", "z", 3)])
    store.close()
    os.remove(path + "-mark")  # a store written before marks existed
    state = open_state("memory", event_log=path)
    assert [e.item_id for e in state.recent("u")] == ["x", "y", "z"]
    state.close()
    for suffix in ("", "-wal", "-shm"):  # the store replaced, its mark (3) left behind
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    a, b = open_state("memory", event_log=path), open_state("memory", event_log=path)
    a.append([ev("v", "w", 4)])
    assert [e.item_id for e in b.recent("v")] == ["w"] and b.recent("u") == ()
    a.close()
    b.close()


def test_an_unopenable_commit_mark_is_an_event_store_error(tmp_path):
    path = str(tmp_path / "events.db")
    os.mkdir(path + "-mark")
    with pytest.raises(EventStoreError, match="events.db-mark: cannot open the store's commit mark"):
        EventStore(path)


def test_read_event_store_and_fold_into_a_log(tmp_path):
    path = str(tmp_path / "events.db")
    store = EventStore(path)
    store.append([ev("u9", "known", 50, "buy", ""), ev("u9", "new", 60, "cart", "c7"), ev("u9", "orphan", 70, "pv", "")])
    store.close()
    extra = read_event_store(path)
    assert list(extra.events["item"]) == ["known", "new", "orphan"]
    assert list(extra.events["behavior"]) == [BEHAVIOR_CODE["buy"], BEHAVIOR_CODE["cart"], BEHAVIOR_CODE["pv"]]

    s = lambda xs: pd.array(xs, dtype="string[pyarrow]")
    base_events = pd.DataFrame({"user": s(["u1"]), "item": s(["known"]), "category": s(["c1"]), "behavior": np.array([1], np.int8), "ts": np.array([10])})
    base_items = pd.DataFrame({"item": s(["known"]), "category": s(["c1"]), "title": s(["Known"]), "tags": s(["t"])})
    folded = fold_events(EventLog(base_events, base_items, "base.csv", ReadReport(rows=1)), extra)
    assert folded.report.rows == 4
    assert list(folded.events["category"]) == ["c1", "c1", "c7", "unknown"]
    items = folded.items.set_index("item")
    assert items.loc["known", "title"] == "Known"  # the base log's metadata wins
    assert items.loc["new", "category"] == "c7"
    assert len(items) == 3


def test_fold_into_a_log_with_integer_ids(tmp_path):
    path = str(tmp_path / "events.db")
    store = EventStore(path)
    store.append([ev("u9", "10", 50, "buy", ""), ev("7", "x", 60, "pv", "c7")])
    store.close()
    base_events = pd.DataFrame({"user": [7], "item": [10], "category": [3], "behavior": np.array([1], np.int8), "ts": np.array([10])})
    base_items = pd.DataFrame({"item": [10], "category": [3], "title": [""], "tags": [""]})
    folded = fold_events(EventLog(base_events, base_items, "base.parquet", ReadReport(rows=1)), read_event_store(path))
    assert list(folded.events["user"]) == ["7", "u9", "7"] and list(folded.events["category"]) == ["3", "3", "c7"]
    assert sorted(folded.items["item"]) == ["10", "x"]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.load(tiny_bundle, MemoryState())


def user_slice(engine, user_id: str):
    data = engine.bundle.data
    u = int(data.users.encode([user_id])[0])
    return data.seqs.offsets[u], data.seqs.offsets[u + 1]


def test_engine_merges_logged_and_recent_events_in_time_order(engine):
    data = engine.bundle.data
    user = str(data.users.decode(np.array([1]))[0])
    lo, hi = user_slice(engine, user)
    end = int(data.seqs.ts[hi - 1])
    a, b, c = (str(x) for x in data.items.decode(np.array([3, 4, 5])))
    engine.state.append([ev(user, b, end + 20, "buy"), ev(user, "not-in-bundle", end + 5), ev(user, a, end + 10, "cart")])
    seqs = engine.history.sequence(RecommendQuery(user_id=user, k=5, recent_events=(Event(c, "fav", end + 15),)))
    assert len(seqs) == hi - lo + 4 - 1  # the unknown item is skipped for scoring
    assert list(data.items.decode(seqs.items[-3:])) == [a, c, b]
    assert list(seqs.behaviors[-3:]) == [BEHAVIOR_CODE["cart"], BEHAVIOR_CODE["fav"], BEHAVIOR_CODE["buy"]]
    assert list(seqs.categories[-3:]) == list(data.item_category[[3, 5, 4]])
    assert "not-in-bundle" in {e.item_id for e in engine.state.recent(user)}  # ... but kept in the state


def test_engine_skips_logged_events_the_bundle_already_holds(engine):
    data = engine.bundle.data
    user = str(data.users.decode(np.array([2]))[0])
    lo, hi = user_slice(engine, user)
    item, ts = str(data.items.decode(data.seqs.items[hi - 1 : hi])[0]), int(data.seqs.ts[hi - 1])
    # The bundle's last event logged again (as after `train --fold-events`) must not count twice.
    folded = UserEvent(user, item, "", BEHAVIORS[data.seqs.behaviors[hi - 1] - 1], ts)
    fresh = ev(user, item, ts - 1, "buy")
    engine.state.append([folded, fresh])
    assert len(engine.history.sequence(RecommendQuery(user_id=user, k=5))) == hi - lo + 1


def test_log_events_fills_categories_and_counts_unknown_items(engine):
    data = engine.bundle.data
    item = str(data.items.decode(np.array([7]))[0])
    unknown = engine.log_events([ev("brand-new-user", item, 100, category=""), ev("brand-new-user", "mystery", 101, category="")])
    assert unknown == 1
    stored = {e.item_id: e.category_id for e in engine.state.recent("brand-new-user")}
    assert stored == {item: str(data.categories.decode(data.item_category[[7]])[0]), "mystery": ""}


def test_state_survives_an_engine_swap(engine):
    swapped = Engine(engine.bundle, engine.state)
    item = str(engine.bundle.data.items.decode(np.array([9]))[0])
    engine.log_events([ev("swap-user", item, 100)])
    assert item in set(engine.bundle.data.items.decode(swapped.history.sequence(RecommendQuery(user_id="swap-user", k=3)).items))


def test_engine_without_state_refuses_events_and_still_serves(tiny_bundle, engine):
    bare = Engine(engine.bundle)
    with pytest.raises(StateUnavailable, match="no user state"):
        bare.log_events([ev("u", "a", 1)])
    assert bare.recommend(RecommendQuery(user_id="u", k=3)).items


def test_unreachable_state_degrades_recommend_to_the_bundle(engine):
    class Down(MemoryState):
        def recent(self, user_id):
            raise StateUnavailable("down for the test")

    down = Engine(engine.bundle, Down())
    assert len(down.recommend(RecommendQuery(user_id="anyone", k=3)).items) == 3


def test_logged_events_count_exactly_like_recent_events(engine):
    """Both stages see logged behaviour the way they see a request's recent_events."""
    data = engine.bundle.data
    user = str(data.users.decode(np.array([5]))[0])
    end = int(data.seqs.ts.max())
    items = [str(x) for x in data.items.decode(np.arange(20, 26))]
    recent = tuple(Event(item, ("pv", "cart", "buy")[n % 3], end + 30 * (n + 1)) for n, item in enumerate(items))
    plain = Engine(engine.bundle).recommend(RecommendQuery(user_id=user, k=20, recent_events=recent))
    logged = Engine(engine.bundle, MemoryState())
    logged.log_events([UserEvent(user, e.item_id, "", e.behavior, e.timestamp) for e in recent])
    live = logged.recommend(RecommendQuery(user_id=user, k=20))
    assert [(r.item_id, round(r.score, 5)) for r in live.items] == [(r.item_id, round(r.score, 5)) for r in plain.items]
    untouched = Engine(engine.bundle).recommend(RecommendQuery(user_id=user, k=20))
    assert [r.item_id for r in live.items] != [r.item_id for r in untouched.items]
