"""Hot swap: a new bundle under the root is loaded off the request path and swapped in under load;
broken bundles are refused with a logged reason while the old one keeps answering."""

import inspect
import logging
import os
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from funnel.bundle import CURRENT, load_bundle, resolve, write_version
from funnel.server.app import ServerOptions, build_server
from funnel.server.engine import Engine
from funnel.server.holder import BundleRefused, EngineHolder
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc
from funnel.tools.loadtest import loadtest

TOKEN = "swap-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def republish(root: str, *, nan_ranker: bool = False) -> str:
    """Publish the current version's pieces again as a new version through ``write_version`` (CURRENT flips to it)."""
    b = load_bundle(root)
    if nan_ranker:
        with torch.no_grad():
            for p in b.ranker.parameters():
                p.fill_(float("nan"))
    # Every piece write_version takes is the loaded bundle's attribute of the same name.
    pieces = {name: getattr(b, name) for name in inspect.signature(write_version).parameters if name not in ("root", "info", "publish")}
    return write_version(root, **pieces, info={"republished_from": b.model_version})


def point_current(root: str, version_dir: str) -> None:
    tmp = os.path.join(root, CURRENT + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(os.path.basename(version_dir) + "\n")
    os.replace(tmp, os.path.join(root, CURRENT))


@pytest.fixture
def root(tiny_bundle, tmp_path) -> str:
    """A private copy of the tiny bundle root, so CURRENT can move without touching other tests."""
    path = str(tmp_path / "root")
    shutil.copytree(tiny_bundle, path)
    return path


@pytest.fixture
def serving(root):
    """A server following ``root`` (token required for Reload); yields (built, addr)."""
    holder = EngineHolder.open(root, Engine.load)
    built = build_server("127.0.0.1:0", holder=holder, options=ServerOptions(max_batch=8, batch_wait_ms=1, token=TOKEN))
    built.server.start()
    yield built, f"127.0.0.1:{built.port}"
    holder.stop_watching()
    built.stop(None)


def users_of(root: str) -> list[str]:
    data = load_bundle(root).data
    return [str(u) for u in data.users.decode(np.arange(1, len(data.users)))]


def test_current_flip_during_load_switches_versions_with_no_failed_request(root, serving):
    built, addr = serving
    v1 = resolve(root)
    v2 = republish(root)
    point_current(root, v1)
    old, new = load_bundle(v1).model_version, load_bundle(v2).model_version
    assert old != new
    built.holder.start_watching(0.1)
    flip = threading.Timer(1.0, point_current, (root, v2))
    flip.start()
    report = loadtest(addr=addr, qps=40, duration=3.0, concurrency=2, users=users_of(root), floor_duration=0.5, timeout=5.0)
    flip.join()
    assert report["errors"] == {}
    assert report["ok"] == report["sent"] == 120
    assert set(report["model_versions"]) == {old, new}
    spans = report["model_version_spans"]
    assert spans[old][0] < spans[new][0] and spans[new][1] > spans[old][1]
    assert built.holder.engine.model_version == new
    assert f'model_version="{new}"' in built.metrics.text()


def test_reload_rpc_swaps_then_reports_no_change(root, serving):
    built, addr = serving
    old = built.holder.engine.model_version
    new = load_bundle(republish(root)).model_version
    with grpc.insecure_channel(addr) as ch:
        stub = recommender_pb2_grpc.RecommenderStub(ch)
        first = stub.Reload(recommender_pb2.ReloadRequest(), metadata=AUTH, timeout=60)
        assert (first.changed, first.model_version) == (True, new)
        again = stub.Reload(recommender_pb2.ReloadRequest(), metadata=AUTH, timeout=60)
        assert (again.changed, again.model_version) == (False, new)
        answer = stub.Recommend(recommender_pb2.RecommendRequest(user_id=users_of(root)[0], k=5), timeout=10)
        assert answer.model_version == new != old


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)])
def test_reload_needs_the_token(serving, metadata):
    _, addr = serving
    with grpc.insecure_channel(addr) as ch:
        with pytest.raises(grpc.RpcError) as err:
            recommender_pb2_grpc.RecommenderStub(ch).Reload(recommender_pb2.ReloadRequest(), metadata=metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in err.value.details()


def corrupt_header(version_dir: str, name: str) -> None:
    """Overwrite the start of a file in place: same size (the manifest check passes), unreadable content."""
    with open(os.path.join(version_dir, name), "r+b") as fh:
        fh.write(b"\0" * 64)


def truncate(version_dir: str, name: str) -> None:
    path = os.path.join(version_dir, name)
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "break_it, reason",
    [
        (lambda v: corrupt_header(v, "rank/ranker.pt"), "ranker.pt"),
        (lambda v: truncate(v, "recall/index.faiss"), "the manifest says"),
        (lambda v: os.remove(os.path.join(v, "recall", "covisit.npz")), "missing"),
    ],
    ids=["corrupt-model", "truncated-index", "missing-file"],
)
def test_broken_bundle_is_refused_and_the_old_one_keeps_answering(root, serving, caplog, break_it, reason):
    built, addr = serving
    old = built.holder.engine.model_version
    user = users_of(root)[0]
    broken = republish(root)
    break_it(broken)
    with grpc.insecure_channel(addr) as ch, caplog.at_level(logging.ERROR, logger="funnel.server.holder"):
        stub = recommender_pb2_grpc.RecommenderStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Reload(recommender_pb2.ReloadRequest(), metadata=AUTH, timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason in err.value.details() and os.path.basename(broken) in err.value.details()
        answer = stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=5), timeout=10)
    assert answer.model_version == old and len(answer.items) == 5
    assert built.holder.engine.model_version == old
    refusals = [r.getMessage() for r in caplog.records if "bundle refused" in r.getMessage()]
    assert refusals and reason in refusals[0] and old in refusals[0]
    assert 'funnel_bundle_reloads_total{outcome="refused"} 1.0' in built.metrics.text()


def test_bundle_that_loads_but_answers_nan_is_refused_by_the_smoke_query(root, serving):
    built, _ = serving
    old = built.holder.engine.model_version
    republish(root, nan_ranker=True)
    with pytest.raises(BundleRefused, match="non-finite"):
        built.holder.reload()
    assert built.holder.engine.model_version == old


def test_watcher_refuses_a_broken_version_once_and_takes_the_next_good_one(root, serving, caplog):
    built, _ = serving
    good = republish(root)
    broken = republish(root)
    corrupt_header(broken, "rank/ranker.pt")
    with caplog.at_level(logging.ERROR, logger="funnel.server.holder"):
        built.holder.start_watching(0.05)
        deadline = time.monotonic() + 30
        while not any("bundle refused" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # several more polls: the refused version is not retried
        refusals = [r for r in caplog.records if "bundle refused" in r.getMessage()]
        assert len(refusals) == 1 and os.path.basename(broken) in refusals[0].getMessage()
        point_current(root, good)
        expected = load_bundle(good).model_version
        while built.holder.engine.model_version != expected and time.monotonic() < deadline:
            time.sleep(0.05)
    assert built.holder.engine.model_version == expected


def test_first_bundle_that_cannot_serve_stops_startup(root):
    corrupt_header(resolve(root), "rank/ranker.pt")
    with pytest.raises(Exception, match="ranker.pt"):
        EngineHolder.open(root, Engine.load)


class Versioned:
    """Answers after ``seconds`` with its own model_version."""

    def __init__(self, version: str, seconds: float) -> None:
        self.model_version = self.index_version = version
        self.seconds = seconds

    def recommend(self, query):
        from funnel.server.query import Recommendation, RecommendResult

        time.sleep(self.seconds)
        return RecommendResult([Recommendation("i1", 1.0, 1.0, "popular")], self.model_version, self.index_version, {})


def test_request_in_flight_during_a_swap_finishes_on_the_old_engine():
    holder = EngineHolder(Versioned("old", 0.5))
    built = build_server("127.0.0.1:0", holder=holder, options=ServerOptions(max_batch=4, batch_wait_ms=0))
    built.server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
            stub = recommender_pb2_grpc.RecommenderStub(ch)
            in_flight = stub.Recommend.future(recommender_pb2.RecommendRequest(user_id="u", k=1), timeout=10)
            time.sleep(0.2)
            holder.engine = Versioned("new", 0.0)
            after = stub.Recommend(recommender_pb2.RecommendRequest(user_id="u", k=1), timeout=10)
            assert in_flight.result().model_version == "old" and after.model_version == "new"
    finally:
        built.stop(None)


def test_startup_falls_back_to_the_newest_version_that_can_serve(root):
    good = resolve(root)
    good_version = load_bundle(good).model_version
    bad = republish(root)  # newer, and CURRENT names it
    corrupt_header(bad, "rank/ranker.pt")
    holder = EngineHolder.open(root, Engine.load)
    assert holder.fallback_from == bad and holder.engine.model_version == good_version
    built = build_server("127.0.0.1:0", holder=holder, options=ServerOptions())
    built.server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
            user = str(holder.engine.bundle.data.users.decode(np.array([1]))[0])
            reply = recommender_pb2_grpc.RecommenderStub(ch).Recommend(recommender_pb2.RecommendRequest(user_id=user, k=5), timeout=30)
        assert reply.model_version == good_version and len(reply.items) == 5
    finally:
        built.stop(None)
    assert 'funnel_bundle_reloads_total{outcome="fallback"} 1.0' in built.metrics.text()
    # With nothing else to fall back to, start-up fails naming the bad file.
    shutil.rmtree(good)
    with pytest.raises(Exception, match="ranker.pt"):
        EngineHolder.open(root, Engine.load)
