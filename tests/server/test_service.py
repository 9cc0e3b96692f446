"""The gRPC layer over a real channel, with a fake engine: validation, errors, health, reflection, client tool."""

import argparse
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from funnel.server.app import create_server
from funnel.server.query import BadQuery, Event, RecommendQuery, RecommendResult, Recommendation
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc
from funnel.tools.recommend import add_arguments, format_result, recommend, run, wait_ready

T0 = 1_700_000_000  # a valid event time (unix seconds)

TIMEOUT = 5.0


class FakeEngine:
    """Returns ``k`` fixed items with descending scores and records the last query; ``fail`` makes it raise."""

    model_version = "model-1"
    index_version = "index-1"

    def __init__(self) -> None:
        self.last_query: RecommendQuery | None = None
        self.fail: Exception | None = None

    def recommend(self, query: RecommendQuery) -> RecommendResult:
        self.last_query = query
        if self.fail is not None:
            raise self.fail
        items = [Recommendation(f"i{n}", 1.0 - n / 10, 0.5 - n / 100, "two_tower", f"title {n}", "c1") for n in range(query.k)]
        return RecommendResult(items, self.model_version, self.index_version, {"recall": 30, "rank": 20, "total": 55})


@pytest.fixture(scope="module")
def server_addr():
    engine = FakeEngine()
    server, port = create_server("127.0.0.1:0", engine, max_workers=2)
    server.start()
    yield engine, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def engine(server_addr):
    fake, _ = server_addr
    fake.fail = None
    fake.last_query = None
    return fake


@pytest.fixture(scope="module")
def channel(server_addr):
    _, addr = server_addr
    with grpc.insecure_channel(addr) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return recommender_pb2_grpc.RecommenderStub(channel)


def call(stub, **fields) -> recommender_pb2.RecommendResponse:
    return stub.Recommend(recommender_pb2.RecommendRequest(**fields), timeout=TIMEOUT)


def rpc_error(stub, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(stub, **fields)
    return err.value


def test_round_trip(engine, stub):
    response = call(stub, user_id="u1", k=3, request_id="req-7")
    assert [i.item_id for i in response.items] == ["i0", "i1", "i2"]
    scores = [i.score for i in response.items]
    assert scores == sorted(scores, reverse=True)
    first = response.items[0]
    assert (first.recall_score, first.channel, first.title, first.category) == (pytest.approx(0.5), "two_tower", "title 0", "c1")
    assert (response.model_version, response.index_version, response.request_id) == ("model-1", "index-1", "req-7")
    assert (response.timings.recall_us, response.timings.rank_us, response.timings.total_us) == (30, 20, 55)


def test_request_fields_reach_the_engine(engine, stub):
    call(
        stub,
        user_id="u1",
        k=2,
        recent_events=[recommender_pb2.Event(item_id="a", behavior="pv", timestamp=T0), recommender_pb2.Event(item_id="b", behavior="buy", timestamp=T0 + 1)],
        exclude_item_ids=["x", "y"],
        include_seen=True,
        category="c9",
        request_id="r",
    )
    assert engine.last_query == RecommendQuery(
        user_id="u1",
        k=2,
        recent_events=(Event("a", "pv", T0), Event("b", "buy", T0 + 1)),
        exclude_item_ids=("x", "y"),
        include_seen=True,
        category="c9",
        request_id="r",
    )


def test_unset_category_is_none_and_empty_category_is_kept(engine, stub):
    call(stub, user_id="u1", k=1)
    assert engine.last_query.category is None and engine.last_query.include_seen is False
    call(stub, user_id="u1", k=1, category="")
    assert engine.last_query.category == ""


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"user_id": "u1", "k": 0}, ["k is required", "1..1000"]),
        ({"user_id": "u1", "k": 100000}, ["1..1000", "100000"]),
        ({"user_id": "u1", "k": -1}, ["1..1000", "-1"]),
        ({"user_id": "", "k": 5}, ["user_id"]),
        ({"user_id": "  ", "k": 5}, ["user_id"]),
        (
            {"user_id": "u1", "k": 5, "recent_events": [recommender_pb2.Event(item_id="a", behavior="pv", timestamp=T0), recommender_pb2.Event(item_id="b", behavior="click", timestamp=T0)]},
            ["recent_events[1]", "'click'", "pv, cart, fav, buy"],
        ),
        ({"user_id": "u1", "k": 5, "recent_events": [recommender_pb2.Event(item_id="", behavior="pv", timestamp=T0)]}, ["recent_events[0].item_id"]),
        ({"user_id": "u1", "k": 5, "recent_events": [recommender_pb2.Event(item_id=" ", behavior="pv", timestamp=T0)]}, ["recent_events[0].item_id"]),
        ({"user_id": "u1", "k": 5, "recent_events": [recommender_pb2.Event(item_id="a", behavior="pv", timestamp=-5)]}, ["recent_events[0].timestamp", "946684800"]),
        ({"user_id": "u1", "k": 5, "recent_events": [recommender_pb2.Event(item_id="a", behavior="pv", timestamp=2**62)]}, ["recent_events[0].timestamp", "plus one day"]),
    ],
)
def test_invalid_requests_are_rejected_before_the_engine(engine, stub, fields, expected):
    err = rpc_error(stub, **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    for text in expected:
        assert text in err.details()
    assert engine.last_query is None


def test_bad_query_from_engine_is_invalid_argument(engine, stub):
    engine.fail = BadQuery("unknown category 'zzz'")
    err = rpc_error(stub, user_id="u1", k=5, category="zzz")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "unknown category 'zzz'"


def test_engine_crash_is_internal_without_traceback(engine, stub, caplog):
    engine.fail = RuntimeError("index exploded")
    with caplog.at_level(logging.ERROR, logger="funnel.server.service"):
        err = rpc_error(stub, user_id="u1", k=5, request_id="req-crash")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "Traceback" not in err.details() and "index exploded" not in err.details()
    assert "req-crash" in err.details()
    record = next(r for r in caplog.records if "req-crash" in r.getMessage())
    assert record.exc_info and "index exploded" in str(record.exc_info[1])


def test_health_is_serving(server_addr, channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "funnel.v1.Recommender"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    wait_ready(server_addr[1], timeout=TIMEOUT)


def test_reflection_lists_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"funnel.v1.Recommender", "grpc.health.v1.Health"} <= names


def test_client_recommend_round_trip(server_addr, engine):
    _, addr = server_addr
    result = recommend(
        addr=addr,
        user_id="u2",
        k=2,
        recent_events=[Event("a", "cart", T0)],
        exclude_item_ids=["x"],
        category="c1",
        request_id="tool",
        timeout=TIMEOUT,
    )
    assert result.items == [
        Recommendation("i0", 1.0, 0.5, "two_tower", "title 0", "c1"),
        Recommendation("i1", pytest.approx(0.9), pytest.approx(0.49), "two_tower", "title 1", "c1"),
    ]
    assert (result.model_version, result.index_version) == ("model-1", "index-1")
    assert result.timings_us == {"recall": 30, "rank": 20, "total": 55}
    assert engine.last_query == RecommendQuery("u2", 2, (Event("a", "cart", T0),), ("x",), False, "c1", "tool")
    text = format_result(result)
    assert "title 1" in text and "model-1" in text and "total 55 us" in text


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="funnel recommend")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_parses_events_and_runs(server_addr, engine, capsys):
    _, addr = server_addr
    args = parse(["--addr", addr, "--user", "u3", "-k", "1", "--event", "it:em:pv:1700000007", "--event", "b:fav:1700000008", "--exclude", "x", "--include-seen"])
    assert run(args) == 0
    assert engine.last_query.recent_events == (Event("it:em", "pv", 1_700_000_007), Event("b", "fav", 1_700_000_008))
    assert engine.last_query.include_seen and engine.last_query.exclude_item_ids == ("x",)
    assert "i0" in capsys.readouterr().out


@pytest.mark.parametrize("event", ["nocolons", "a:click:1", "a:pv:soon", ":pv:1"])
def test_cli_bad_event_is_an_argparse_error(event, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["--addr", "h:1", "--user", "u", "--event", event])
    assert exit_.value.code == 2
    assert event in capsys.readouterr().err


def test_cli_rpc_error_exits_2(server_addr, engine, capsys):
    _, addr = server_addr
    with pytest.raises(SystemExit) as exit_:
        run(parse(["--addr", addr, "--user", "u", "-k", "0"]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: k is required")
