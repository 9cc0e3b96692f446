"""Micro-batching: gathering, per-item errors, deadlines; the engine's batch path equals one-at-a-time."""

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from funnel.server import batching
from funnel.server.app import ServerOptions, build_server
from funnel.server.batching import DeadlineExpired, MicroBatcher, Overloaded
from funnel.server.engine import Engine
from funnel.server.holder import EngineHolder
from funnel.server.query import BadQuery, Event, RecommendQuery, RecommendResult, Recommendation
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc


class Gate:
    """A batch function whose first call blocks until released, recording every batch it gets."""

    def __init__(self, fail_on=None) -> None:
        self.batches: list[list] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            self.release.wait(5)
        return [ValueError(f"bad {x}") if x == self.fail_on else x * 10 for x in items]


def test_requests_waiting_during_a_batch_form_the_next_batch():
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=3, max_wait_s=0)
    first = batcher.submit(0)
    assert gate.entered.wait(5)
    rest = [batcher.submit(i) for i in range(1, 6)]
    gate.release.set()
    assert [f.result(5) for f in [first, *rest]] == [0, 10, 20, 30, 40, 50]
    assert gate.batches == [[0], [1, 2, 3], [4, 5]]
    batcher.close()


def test_wait_gathers_items_that_arrive_shortly_after_the_first():
    batches = []
    batcher = MicroBatcher(lambda xs: batches.append(list(xs)) or xs, max_batch=8, max_wait_s=0.5)
    futures = [batcher.submit(1)]
    time.sleep(0.05)
    futures.append(batcher.submit(2))
    assert [f.result(5) for f in futures] == [1, 2]
    assert batches == [[1, 2]]
    batcher.close()


def test_an_error_for_one_item_fails_only_that_item():
    gate = Gate(fail_on=2)
    batcher = MicroBatcher(gate, max_batch=8, max_wait_s=0)
    first = batcher.submit(0)
    assert gate.entered.wait(5)
    futures = [batcher.submit(i) for i in (1, 2, 3)]
    gate.release.set()
    assert first.result(5) == 0 and futures[0].result(5) == 10 and futures[2].result(5) == 30
    with pytest.raises(ValueError, match="bad 2"):
        futures[1].result(5)
    batcher.close()


def test_a_failing_batch_fails_each_of_its_items():
    def boom(items):
        raise RuntimeError("engine down")

    batcher = MicroBatcher(boom, max_batch=4, max_wait_s=0)
    with pytest.raises(RuntimeError, match="engine down"):
        batcher.submit(1).result(5)
    batcher.close()


def test_expired_items_are_not_computed():
    gate = Gate()
    stats = []
    batcher = MicroBatcher(gate, max_batch=8, max_wait_s=0, on_batch=stats.append)
    first = batcher.submit(0)
    assert gate.entered.wait(5)
    expired = batcher.submit(1, deadline=time.monotonic() + 0.01)
    alive = batcher.submit(2, deadline=time.monotonic() + 60)
    time.sleep(0.05)
    gate.release.set()
    with pytest.raises(DeadlineExpired):
        expired.result(5)
    assert first.result(5) == 0 and alive.result(5) == 20
    assert gate.batches == [[0], [2]]
    assert [(s.size, s.expired) for s in stats] == [(1, 0), (1, 1)]
    batcher.close()


def test_a_batch_reaches_an_event_loop_in_one_callback():
    """Awaited items: each batch wakes the loop once, whatever its size; errors reach their own caller."""
    gate = Gate(fail_on=2)
    batcher = MicroBatcher(gate, max_batch=4, max_wait_s=0)

    async def main() -> tuple[list, list]:
        loop = asyncio.get_running_loop()
        wakes = []
        schedule = loop.call_soon_threadsafe

        def counted(callback, *args, **kwargs):
            if callback is batching._set_all:
                wakes.append(len(args[0]))
            return schedule(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted
        first = batcher.submit_async(0)
        assert await asyncio.to_thread(gate.entered.wait, 5)
        rest = [batcher.submit_async(i) for i in (1, 2, 3)]
        gate.release.set()
        return [await first, *await asyncio.gather(*rest, return_exceptions=True)], wakes

    results, wakes = asyncio.run(main())
    batcher.close()
    assert results[:2] == [0, 10] and isinstance(results[2], ValueError) and results[3] == 30
    assert wakes == [1, 3]


def test_an_awaited_item_cancelled_before_its_batch_is_not_computed():
    gate = Gate()
    stats = []
    batcher = MicroBatcher(gate, max_batch=4, max_wait_s=0, on_batch=stats.append)

    async def main():
        first = batcher.submit_async(0)
        assert await asyncio.to_thread(gate.entered.wait, 5)
        doomed, kept = batcher.submit_async(1), batcher.submit_async(2)
        doomed.cancel()
        gate.release.set()
        return await first, await kept

    assert asyncio.run(main()) == (0, 20)
    batcher.close()
    assert gate.batches == [[0], [2]]
    assert [s.expired for s in stats] == [0, 1]


def test_bad_settings_and_closed_batcher_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda xs: xs, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        MicroBatcher(lambda xs: xs, max_wait_s=-1)
    batcher = MicroBatcher(lambda xs: xs)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def _queries(engine: Engine) -> list[RecommendQuery]:
    data = engine.bundle.data
    users = [str(u) for u in data.users.decode(np.arange(1, 6))]
    item = str(data.items.decode(np.array([3]))[0])
    category = str(data.categories.decode(np.array([1]))[0])
    return [
        RecommendQuery(user_id=users[0], k=10),
        RecommendQuery(user_id=users[1], k=5, exclude_item_ids=(item,)),
        RecommendQuery(user_id="never-seen", k=10, recent_events=(Event(item, "buy", 1_600_000_000),)),
        RecommendQuery(user_id=users[2], k=10, category="no-such-category"),
        RecommendQuery(user_id=users[3], k=7, category=category),
        RecommendQuery(user_id=users[4], k=300, include_seen=True),
        RecommendQuery(user_id=users[0], k=3, category=category),
    ]


def test_engine_batch_path_answers_each_query_as_if_alone(tiny_bundle):
    engine = Engine.load(tiny_bundle)
    queries = _queries(engine)
    batch = engine.recommend_batch(queries)
    assert len(batch) == len(queries)
    for query, got in zip(queries, batch):
        if query.category == "no-such-category":
            assert isinstance(got, BadQuery) and "no-such-category" in str(got)
            with pytest.raises(BadQuery):
                engine.recommend(query)
            continue
        alone = engine.recommend(query)
        assert [r.item_id for r in got.items] == [r.item_id for r in alone.items]
        np.testing.assert_allclose([r.score for r in got.items], [r.score for r in alone.items], rtol=1e-5, atol=1e-6)
        assert len(got.items) == min(query.k, len(alone.items)) and got.items


class SlowEngine:
    """Sleeps in every batch and records the queries it computed."""

    model_version = index_version = "slow-1"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.computed: list[str] = []

    def recommend_batch(self, queries):
        time.sleep(self.seconds)
        self.computed += [q.request_id for q in queries]
        return [RecommendResult([Recommendation("i1", 1.0, 1.0, "popular")], self.model_version, self.index_version, {}) for _ in queries]


def test_request_whose_deadline_passed_in_the_queue_is_not_computed():
    engine = SlowEngine(0.6)
    built = build_server("127.0.0.1:0", holder=EngineHolder(engine), options=ServerOptions(max_batch=4, batch_wait_ms=0))
    built.server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
            stub = recommender_pb2_grpc.RecommenderStub(ch)
            slow = stub.Recommend.future(recommender_pb2.RecommendRequest(user_id="u", k=1, request_id="first"), timeout=5)
            time.sleep(0.2)  # "first" is computing; the next one queues behind it
            with pytest.raises(grpc.RpcError) as err:
                stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=1, request_id="late"), timeout=0.1)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert slow.result().items[0].item_id == "i1"
            time.sleep(0.8)
    finally:
        built.stop(None)
    assert engine.computed == ["first"]
    assert "funnel_deadline_expired_total 1.0" in built.metrics.text()


def test_item_that_cannot_finish_before_its_deadline_is_not_computed():
    computed = []

    def slow(items):
        time.sleep(0.3)
        computed.extend(items)
        return items

    batcher = MicroBatcher(slow, max_batch=8, max_wait_s=0)
    assert batcher.submit("first").result(5) == "first"  # teaches the batcher that a batch takes ~0.3 s
    # Admission control refuses it on arrival; the batch start check drops it had it been queued.
    with pytest.raises(Overloaded, match="more than the"):
        batcher.submit("hopeless", deadline=time.monotonic() + 0.1)
    assert batcher.submit("roomy", deadline=time.monotonic() + 30).result(5) == "roomy"
    assert computed == ["first", "roomy"]
    batcher.close()


def test_overload_is_shed_on_arrival_and_the_queue_recovers():
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=1, max_wait_s=0, max_queue=3)
    first = batcher.submit(0)
    assert gate.entered.wait(5)
    queued = [batcher.submit(i) for i in (1, 2, 3)]
    with pytest.raises(Overloaded, match="3 requests already queued"):
        batcher.submit(4)
    gate.release.set()
    assert first.result(5) == 0 and [f.result(5) for f in queued] == [10, 20, 30]
    # Each batch of one took no time once released: a deadline far less than the gate's wait is admitted again.
    assert batcher.submit(5, deadline=time.monotonic() + 1).result(5) == 50
    batcher.close()


def test_one_stalled_batch_does_not_shed_requests_that_would_finish_in_time():
    stall = threading.Event()

    def run(items):
        if stall.is_set():
            stall.clear()
            time.sleep(0.5)  # something else held the process (e.g. a bundle loading for a swap)
        else:
            time.sleep(0.002)
        return items

    batcher = MicroBatcher(run, max_batch=1, max_wait_s=0)
    for i in range(20):  # learns a batch of one takes ~2 ms
        batcher.submit(i).result(5)
    stall.set()
    batcher.submit("stalled").result(5)
    # Ten queued requests cost ~20 ms; a 500 ms deadline is comfortably met, so none is refused.
    futures = [batcher.submit(i, deadline=time.monotonic() + 0.5) for i in range(10)]
    assert [f.result(5) for f in futures] == list(range(10))
    batcher.close()


class ThreadCountEngine:
    """Answers with the OpenMP thread count of the thread it runs on, as the item's score."""

    model_version, index_version = "m", "i"

    def recommend(self, query: RecommendQuery) -> RecommendResult:
        return self.recommend_batch([query])[0]

    def recommend_batch(self, queries: list) -> list:
        import faiss

        n = float(faiss.omp_get_max_threads())
        return [RecommendResult([Recommendation("i1", n, n, "popular")], self.model_version, self.index_version, {}) for _ in queries]


@pytest.mark.parametrize("max_batch", [1, 4])
def test_the_engine_runs_with_the_openmp_limit_of_the_thread_that_built_the_server(max_batch):
    """OpenMP keeps its thread count per thread: without handing it on, the batcher's and
    the blocking pool's threads would run faiss at one thread per core (a spinning worker)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        built = build_server("127.0.0.1:0", holder=EngineHolder(ThreadCountEngine()), options=ServerOptions(max_batch=max_batch))
    finally:
        faiss.omp_set_num_threads(before)
    built.server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
            reply = recommender_pb2_grpc.RecommenderStub(ch).Recommend(recommender_pb2.RecommendRequest(user_id="u", k=1), timeout=5)
    finally:
        built.stop(None)
    assert reply.items[0].score == 1.0


@pytest.mark.parametrize("limit", [2, 0])
def test_rpcs_past_the_concurrency_limit_are_refused_at_once(limit):
    engine = SlowEngine(0.5)
    built = build_server("127.0.0.1:0", holder=EngineHolder(engine), options=ServerOptions(max_batch=4, max_concurrent_rpcs=limit))
    built.server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
            stub = recommender_pb2_grpc.RecommenderStub(ch)
            calls = []
            for i in range(5):
                calls.append(stub.Recommend.future(recommender_pb2.RecommendRequest(user_id="u", k=1, request_id=f"r{i}"), timeout=10))
                time.sleep(0.05)  # in order: the first ones are in progress when the later ones arrive
            in_flight = built.metrics.text()
            codes = [c.code() for c in calls]
            # Once those finished, the limit has room again.
            after = stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=1, request_id="after"), timeout=10)
    finally:
        built.stop(None)
    assert after.items[0].item_id == "i1"
    assert "funnel_rpcs_in_progress 0.0" in built.metrics.text()
    if limit:
        assert "funnel_rpcs_in_progress 2.0" in in_flight  # the refused ones never reached a handler
        assert codes == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        assert engine.computed == ["r0", "r1", "after"]
    else:
        assert codes == [grpc.StatusCode.OK] * 5


def test_a_negative_concurrency_limit_is_refused():
    with pytest.raises(ValueError, match="max_concurrent_rpcs must be >= 0"):
        ServerOptions(max_concurrent_rpcs=-1)
