"""Operations: Prometheus metrics, request limits, bearer token, TLS, access log."""

import logging
import subprocess
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from funnel.server.app import ServerOptions, build_server
from funnel.server.holder import EngineHolder
from funnel.server.query import RecommendResult, Recommendation
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc
from funnel.server.service import MAX_RECENT_EVENTS

TOKEN = "ops-token"


class Engine:
    """k fixed items; no state, so LogEvents past the token check is FAILED_PRECONDITION."""

    model_version = "m-1"
    index_version = "i-1"

    def recommend(self, query):
        items = [Recommendation(f"i{n}", 1.0 - n / 10, 0.5, "popular") for n in range(query.k)]
        return RecommendResult(items, self.model_version, self.index_version, {"recall": 40, "rank": 60, "total": 100})


@pytest.fixture(scope="module")
def built():
    built = build_server("127.0.0.1:0", holder=EngineHolder(Engine()), options=ServerOptions(max_batch=4, token=TOKEN, max_message_bytes=2000))
    built.server.start()
    yield built
    built.stop(None)


@pytest.fixture(scope="module")
def stub(built):
    with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
        yield recommender_pb2_grpc.RecommenderStub(ch)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_metrics_count_requests_by_status_and_expose_stages_batches_and_bundle(built, stub):
    for _ in range(3):
        stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=2), timeout=5)
    code_of(lambda: stub.Recommend(recommender_pb2.RecommendRequest(user_id="", k=2), timeout=5))
    http = built.metrics.serve(0, "127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http.server_port}/metrics", timeout=5).read().decode()
    finally:
        http.shutdown()
    ok = [line for line in text.splitlines() if line.startswith('funnel_requests_total{code="OK",method="Recommend"}')]
    assert ok and float(ok[0].split()[-1]) >= 3
    assert 'funnel_requests_total{code="INVALID_ARGUMENT",method="Recommend"} 1.0' in text
    assert 'funnel_stage_seconds_count{stage="recall"}' in text and 'funnel_stage_seconds_count{stage="queue"}' in text
    assert "funnel_batch_size_count" in text and 'funnel_request_seconds_bucket{le="0.005",method="Recommend"}' in text
    assert 'funnel_bundle_info{index_version="i-1",model_version="m-1"} 1.0' in text
    assert "funnel_events_logged_total 0.0" in text


def test_bundle_gauge_moves_to_the_new_version():
    from funnel.server.metrics import Metrics

    metrics = Metrics()
    metrics.set_bundle("a", "a")
    metrics.set_bundle("b", "c")
    text = metrics.text()
    assert 'funnel_bundle_info{index_version="a",model_version="a"} 0.0' in text
    assert 'funnel_bundle_info{index_version="c",model_version="b"} 1.0' in text


def test_oversize_request_is_invalid_argument_with_its_size(stub):
    request = recommender_pb2.RecommendRequest(user_id="u", k=2, exclude_item_ids=[f"item-{i}" for i in range(400)])
    code, details = code_of(lambda: stub.Recommend(request, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(request.ByteSize()) in details and "2000" in details


def test_too_many_recent_events_is_invalid_argument():
    from funnel.server.service import validate
    from funnel.server.query import BadQuery

    request = recommender_pb2.RecommendRequest(user_id="u", k=2, recent_events=[recommender_pb2.Event(item_id="i", behavior="pv")] * (MAX_RECENT_EVENTS + 1))
    with pytest.raises(BadQuery, match=f"at most {MAX_RECENT_EVENTS}"):
        validate(request)


def test_too_many_recent_events_over_the_wire():
    built = build_server("127.0.0.1:0", holder=EngineHolder(Engine()), options=ServerOptions(max_batch=1))
    built.server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
            stub = recommender_pb2_grpc.RecommenderStub(ch)
            events = [recommender_pb2.Event(item_id="i", behavior="pv", timestamp=1_700_000_000)] * (MAX_RECENT_EVENTS + 1)
            code, details = code_of(lambda: stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=2, recent_events=events), timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "recent_events" in details
            fine = stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=2, recent_events=events[:MAX_RECENT_EVENTS]), timeout=5)
            assert len(fine.items) == 2
    finally:
        built.stop(None)


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer nope"),), (("authorization", f"Basic {TOKEN}"),)], ids=["missing", "wrong", "scheme"])
def test_log_events_needs_the_token(stub, metadata):
    request = recommender_pb2.LogEventsRequest(events=[recommender_pb2.Event(user_id="u", item_id="i", behavior="pv", timestamp=1_700_000_000)])
    code, details = code_of(lambda: stub.LogEvents(request, metadata=metadata, timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "LogEvents" in details


def test_right_token_passes_and_recommend_needs_none(stub):
    request = recommender_pb2.LogEventsRequest(events=[recommender_pb2.Event(user_id="u", item_id="i", behavior="pv", timestamp=1_700_000_000)])
    code, _ = code_of(lambda: stub.LogEvents(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5))
    assert code != grpc.StatusCode.UNAUTHENTICATED  # past the check: this engine keeps no state
    reload = stub.Reload(recommender_pb2.ReloadRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
    assert (reload.changed, reload.model_version) == (False, "m-1")
    assert len(stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=3), timeout=5).items) == 3


def test_failed_rpcs_are_logged_with_their_request_id(stub, caplog):
    with caplog.at_level(logging.WARNING, logger="funnel.access"):
        code_of(lambda: stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=0, request_id="req-42"), timeout=5))
        # context.abort sends the status before the interceptor's record is written, so the
        # client can see the error first: wait for the record rather than race it.
        deadline = time.monotonic() + 5
        while not any(r.name == "funnel.access" for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)
    records = [r for r in caplog.records if r.name == "funnel.access"]
    assert records and records[-1].request_id == "req-42" and records[-1].code == "INVALID_ARGUMENT" and records[-1].method == "Recommend"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    key, cert = str(d / "key.pem"), str(d / "cert.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return key, cert


def test_tls_server_answers_tls_clients_only(tls_files):
    key, cert = tls_files
    built = build_server("127.0.0.1:0", holder=EngineHolder(Engine()), options=ServerOptions(tls_cert=cert, tls_key=key))
    built.server.start()
    try:
        with open(cert, "rb") as fh:
            creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
        with grpc.secure_channel(f"localhost:{built.port}", creds) as ch:
            answer = recommender_pb2_grpc.RecommenderStub(ch).Recommend(recommender_pb2.RecommendRequest(user_id="u", k=2), timeout=10)
            assert len(answer.items) == 2
        with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
            code, _ = code_of(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        built.stop(None)


def test_tls_needs_both_files(tls_files):
    with pytest.raises(ValueError, match="both"):
        build_server("127.0.0.1:0", holder=EngineHolder(Engine()), options=ServerOptions(tls_cert=tls_files[1]))


def test_json_log_lines_carry_the_structured_fields():
    import json

    from funnel.server.logs import JsonFormatter

    record = logging.LogRecord("funnel.access", logging.WARNING, "f.py", 1, "rpc %s", ("Recommend",), None)
    record.request_id, record.code = "req-7", "INTERNAL"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "rpc Recommend" and line["level"] == "WARNING" and line["logger"] == "funnel.access"
    assert (line["request_id"], line["code"]) == ("req-7", "INTERNAL") and "args" not in line
