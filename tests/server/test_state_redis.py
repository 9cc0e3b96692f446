"""User state in Redis, against a real ``redis-server`` (the ``redis_url`` fixture of ``conftest.py``)."""

import time

import grpc
import numpy as np
import pytest

from funnel.events.eventlog import UserEvent
from funnel.server.app import create_server
from funnel.server.engine import Engine
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc
from funnel.server.state import LoggedState, RedisState, StateUnavailable, open_state


@pytest.fixture
def prefix(request) -> str:
    """A key prefix per test, so tests sharing the server do not see each other's users."""
    return f"test:{request.node.name}:"


def ev(user: str, item: str, ts: int, behavior: str = "pv", category: str = "c") -> UserEvent:
    return UserEvent(user, item, category, behavior, ts)


def test_append_and_read_back_in_time_order(redis_url, prefix):
    state = RedisState(redis_url, prefix=prefix)
    state.append([ev("u", "a", 10, "buy", "c1"), ev("v", "x", 5), ev("u", "b", 5, "pv", "")])
    state.append([ev("u", "c", 7, "cart", "k:with,odd\"chars")])
    assert state.recent("u") == (ev("u", "b", 5, "pv", ""), ev("u", "c", 7, "cart", "k:with,odd\"chars"), ev("u", "a", 10, "buy", "c1"))
    assert state.recent("nobody") == ()
    assert state.total_appended() == 4


def test_lists_are_trimmed_to_the_bound(redis_url, prefix):
    state = RedisState(redis_url, max_events_per_user=3, prefix=prefix)
    state.append([ev("u", f"i{n}", n) for n in range(5)])
    assert [e.item_id for e in state.recent("u")] == ["i2", "i3", "i4"]


def test_replicas_share_one_state(redis_url, prefix):
    one, two = RedisState(redis_url, prefix=prefix), RedisState(redis_url, prefix=prefix)
    one.append([ev("shared", "a", 1)])
    two.append([ev("shared", "b", 2)])
    assert [e.item_id for e in one.recent("shared")] == [e.item_id for e in two.recent("shared")] == ["a", "b"]


def test_unreachable_redis_is_state_unavailable(redis_url, unused_port):
    with pytest.raises(StateUnavailable, match="cannot reach Redis"):
        RedisState(f"redis://127.0.0.1:{unused_port}/0")


def test_open_state_with_event_log_archives_without_replaying(redis_url, tmp_path):
    path = str(tmp_path / "events.db")
    first = open_state(redis_url, event_log=path)
    assert isinstance(first, LoggedState) and isinstance(first.inner, RedisState)
    user = f"archived-{time.monotonic_ns()}"
    first.append([ev(user, "a", 1)])
    first.close()
    # Redis already holds the shared state: a restart must not append the archive again.
    second = open_state(redis_url, event_log=path)
    assert [e.item_id for e in second.recent(user)] == ["a"]
    assert second.store.count() == 1
    second.close()


def test_log_events_on_one_replica_changes_recommend_on_another(redis_url, tiny_bundle):
    """Two servers, one Redis: what is logged through one is used by the other's next Recommend."""
    bundle = Engine.load(tiny_bundle).bundle
    prefix = f"replicas-{time.monotonic_ns()}:"
    servers = [create_server("127.0.0.1:0", Engine(bundle, RedisState(redis_url, prefix=prefix)), max_workers=2) for _ in range(2)]
    stubs, channels = [], []
    try:
        for server, port in servers:
            server.start()
            channels.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
            stubs.append(recommender_pb2_grpc.RecommenderStub(channels[-1]))
        data = bundle.data
        item = str(data.items.decode(np.array([1]))[0])
        request = recommender_pb2.RecommendRequest(user_id="replica-user", k=20)
        cold = [r.item_id for r in stubs[1].Recommend(request, timeout=10).items]
        response = stubs[0].LogEvents(
            recommender_pb2.LogEventsRequest(events=[recommender_pb2.Event(user_id="replica-user", item_id=item, behavior="buy", timestamp=int(data.seqs.ts.max()) + 1)]),
            timeout=10,
        )
        assert response.accepted == 1
        warm = [r.item_id for r in stubs[1].Recommend(request, timeout=10).items]
        assert item not in warm  # the other replica sees the item as already bought
        assert warm != cold
    finally:
        for channel in channels:
            channel.close()
        for server, _ in servers:
            server.stop(None)
