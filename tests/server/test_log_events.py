"""LogEvents over a real gRPC channel: validation, storage, and the next Recommend reacting to it."""

from collections import Counter

import grpc
import numpy as np
import pytest

from funnel.server.app import create_server
from funnel.server.engine import Engine
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc
from funnel.server.service import MAX_LOG_EVENTS
from funnel.server.state import MemoryState

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def live(tiny_bundle):
    engine = Engine.load(tiny_bundle, MemoryState())
    server, port = create_server("127.0.0.1:0", engine, max_workers=4)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield engine, recommender_pb2_grpc.RecommenderStub(channel)
    server.stop(None)


def event(user_id="u", item_id="i", behavior="pv", timestamp=1_700_000_000, category_id="") -> recommender_pb2.Event:
    return recommender_pb2.Event(user_id=user_id, item_id=item_id, behavior=behavior, timestamp=timestamp, category_id=category_id)


def log_events(stub, events) -> recommender_pb2.LogEventsResponse:
    return stub.LogEvents(recommender_pb2.LogEventsRequest(events=events), timeout=TIMEOUT)


def top(stub, user_id: str, k: int = 10, include_seen: bool = False) -> list[recommender_pb2.ScoredItem]:
    return list(stub.Recommend(recommender_pb2.RecommendRequest(user_id=user_id, k=k, include_seen=include_seen), timeout=TIMEOUT).items)


def item_id(engine, i: int) -> str:
    return str(engine.bundle.data.items.decode(np.array([i]))[0])


@pytest.mark.parametrize(
    "events, message",
    [
        ([], "1..10000 events, got 0"),
        ([event()] * (MAX_LOG_EVENTS + 1), f"got {MAX_LOG_EVENTS + 1}"),
        ([event(), event(user_id="")], "events[1].user_id"),
        ([event(user_id="  ")], "events[0].user_id"),
        ([event(), event(), event(item_id="")], "events[2].item_id"),
        ([event(behavior="click")], "events[0].behavior 'click'"),
        ([event(item_id=" ")], "events[0].item_id"),
        ([event(timestamp=0)], "events[0].timestamp"),
        ([event(), event(timestamp=-5)], "events[1].timestamp must be unix seconds from 946684800 (2000-01-01)"),
        ([event(timestamp=946_684_799)], "events[0].timestamp"),
        ([event(timestamp=2**62)], "the server's clock plus one day), got 4611686018427387904"),
    ],
)
def test_bad_batches_are_invalid_argument_and_store_nothing(live, events, message):
    engine, stub = live
    with pytest.raises(grpc.RpcError) as err:
        log_events(stub, events)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert engine.state.recent("u") == ()


def test_accepts_new_users_and_unknown_items(live):
    engine, stub = live
    known = item_id(engine, 11)
    response = log_events(stub, [event("newcomer", known, "buy", 1_700_000_001), event("newcomer", "not-in-bundle", "cart", 1_700_000_002, "c99")])
    assert (response.accepted, response.unknown_items) == (2, 1)
    assert [(e.item_id, e.behavior) for e in engine.state.recent("newcomer")] == [(known, "buy"), ("not-in-bundle", "cart")]
    # The new user is known now: the logged item counts as seen, so it is not recommended back.
    assert known not in {r.item_id for r in top(stub, "newcomer", k=50)}
    assert known in {r.item_id for r in top(stub, "newcomer", k=400, include_seen=True)}


def test_server_without_state_refuses_log_events(live):
    engine, _ = live
    server, port = create_server("127.0.0.1:0", Engine(engine.bundle), max_workers=2)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as err:
            log_events(recommender_pb2_grpc.RecommenderStub(channel), [event()])
    finally:
        server.stop(None)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "without user state" in err.value.details()


def test_ten_events_in_one_category_raise_its_share_of_the_top_10(live):
    engine, stub = live
    data = engine.bundle.data
    # A user with little history, the case real-time behaviour is for: 10 new events
    # should outweigh what the bundle knows (long histories pin the tiny ranker's taste).
    user = int(np.argsort(data.seqs.lengths[1:], kind="stable")[0]) + 1
    user_id = str(data.users.decode(np.array([user]))[0])
    seen = set(data.seqs.items[data.seqs.offsets[user] : data.seqs.offsets[user + 1]].tolist())
    before = Counter(r.category for r in top(stub, user_id))
    # The category the top 10 under-represents most; among equals, the one with most unseen items.
    unseen = {int(c): [i for i in np.flatnonzero(data.item_category == c) if i not in seen] for c in range(1, data.categories.size)}
    name = lambda c: str(data.categories.decode(np.array([c]))[0])
    target = min(unseen, key=lambda c: (before[name(c)], -len(unseen[c]), c))
    items = unseen[target][:10]
    assert len(items) == 10
    end = int(data.seqs.ts.max())
    response = log_events(stub, [event(user_id, item_id(engine, i), "pv", end + 60 * (j + 1)) for j, i in enumerate(items)])
    assert response.accepted == 10
    after = Counter(r.category for r in top(stub, user_id))
    assert after[name(target)] > before[name(target)], (name(target), before, after)


def test_logged_events_are_counted_in_the_metrics(tiny_bundle):
    from funnel.server.app import build_server
    from funnel.server.holder import EngineHolder

    built = build_server("127.0.0.1:0", holder=EngineHolder(Engine.load(tiny_bundle, MemoryState())))
    built.server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{built.port}") as channel:
            log_events(recommender_pb2_grpc.RecommenderStub(channel), [event(user_id="counted"), event(user_id="counted", timestamp=1_700_000_001)])
        assert "funnel_events_logged_total 2.0" in built.metrics.text()
    finally:
        built.stop(None)
