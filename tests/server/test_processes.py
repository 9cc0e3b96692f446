"""Several server processes on one port: a real ``funnel serve --processes 2`` with its state in Redis or in the shared event log."""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from funnel.server.app import BindError, ServerOptions, build_server, create_server
from funnel.server.engine import Engine
from funnel.server.holder import EngineHolder
from funnel.server import processes as processes_module
from funnel.server.processes import ProcessesError, core_groups, serve_processes
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc
from funnel.tools.recommend import wait_ready
from tests.server.conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 120.0
CONNECTIONS = 8


@pytest.mark.parametrize(
    "processes, kwargs, message",
    [
        (1, {"port": 5000, "state": "redis://h:1"}, "2 or more"),
        (2, {"port": 0, "state": "redis://h:1"}, "fixed --port"),
        (2, {"port": 5000, "state": "memory"}, "event log"),
    ],
)
def test_settings_several_processes_cannot_share_are_refused(processes, kwargs, message):
    with pytest.raises(ProcessesError, match=message):
        serve_processes(processes, {"bundle_dir": "unused", **kwargs})


def test_core_groups_split_the_cores_between_the_processes():
    assert core_groups([0, 1], 2) == [{0}, {1}]
    assert core_groups([0, 1], 4) == [{0}, {1}, {0}, {1}]  # more processes than cores: round robin
    assert core_groups([2, 3, 5, 7], 2) == [{2, 3}, {5, 7}]  # the cores allowed, not 0..n-1
    assert core_groups(list(range(16)), 3) == [set(range(0, 5)), set(range(5, 11)), set(range(11, 16))]  # every core used
    assert core_groups([0, 1, 2], 1) == [{0, 1, 2}]


def test_a_process_that_cannot_be_pinned_serves_unpinned(monkeypatch, caplog):
    served = []
    monkeypatch.setattr(processes_module, "serve", lambda **kwargs: served.append(kwargs))
    monkeypatch.setattr(processes_module, "_stop_with_parent", lambda parent: None)  # this is the test process: no parent-death signal
    monkeypatch.setattr(processes_module.signal, "signal", lambda *args: None)  # nor pytest's handlers reset
    before = os.sched_getaffinity(0)
    with caplog.at_level(logging.WARNING, logger=processes_module.__name__):
        processes_module._child(0, 2, {"port": 1}, os.getpid(), {max(before) + 4096})  # a core this machine does not have
    assert served == [{"port": 1}] and os.sched_getaffinity(0) == before
    assert "could not pin to cores" in caplog.text


def test_one_process_does_not_share_its_port(tiny_bundle):
    engine = Engine.load(tiny_bundle)
    server, port = create_server("127.0.0.1:0", engine)
    try:
        with pytest.raises(BindError, match="another server"):
            build_server(f"127.0.0.1:{port}", holder=EngineHolder(engine), options=ServerOptions())
    finally:
        server.stop(None)


def _port_pair() -> int:
    """A loopback port ``p`` with ``p + 1`` free too: the metrics ports of two processes."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free loopback ports")


def _serve(args: list[str], log_path) -> subprocess.Popen:
    """Start ``funnel serve ARGS`` with its output in ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "funnel.tools", "serve", *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def _wait_serving(proc: subprocess.Popen, addr: str, log_path) -> None:
    """Wait until ``addr`` is SERVING; fail at once, with the server's log, if ``proc`` exits first or it takes too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"funnel serve exited with code {proc.returncode} before serving; its log:\n{log_path.read_text()}")
        try:
            wait_ready(addr, timeout=2.0)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                pytest.fail(f"{addr} not SERVING within {START_TIMEOUT_S:g}s; the server's log:\n{log_path.read_text()}")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def _connection(addr: str, i: int) -> grpc.Channel:
    # A subchannel pool per channel, so each is a TCP connection of its own for the kernel to place.
    return grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1), ("test.connection", i)])


@pytest.fixture(params=["redis", "event-log"])
def shared_state(request, tmp_path) -> list[str]:
    """``funnel serve`` arguments for user state the processes share: Redis, or the embedded default with its SQLite event log."""
    if request.param == "redis":
        return ["--state", request.getfixturevalue("redis_url")]
    return ["--event-log", str(tmp_path / "events.db")]


@pytest.mark.slow
def test_processes_share_the_port_and_the_users_state(tiny_bundle, shared_state, unused_port, tmp_path):
    metrics_port = _port_pair()
    port = unused_port
    log_path = tmp_path / "serve.log"
    args = ["--bundle", tiny_bundle, "--host", "127.0.0.1", "--port", str(port), "--processes", "2", *shared_state, "--watch-interval", "0", "--metrics-port", str(metrics_port)]
    proc = _serve(args, log_path)
    addr = f"127.0.0.1:{port}"
    channels = []
    try:
        _wait_serving(proc, addr, log_path)
        _wait_metrics((metrics_port, metrics_port + 1), log_path)  # one metrics endpoint per process: both are up
        children = _children(proc.pid)
        assert len(children) == 2
        # Each process runs on cores of its own, every one of its threads included (they inherit the mask).
        masks = [{frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")} for pid in children]
        assert all(len(m) == 1 for m in masks), masks
        assert sorted(sorted(next(iter(m))) for m in masks) == sorted(sorted(g) for g in core_groups(sorted(os.sched_getaffinity(0)), 2))

        engine = Engine.load(tiny_bundle)
        data = engine.bundle.data
        items = [str(i) for i in data.items.decode(range(1, 11))]
        end = int(data.seqs.ts.max())
        channels = [_connection(addr, i) for i in range(CONNECTIONS)]
        stubs = [recommender_pb2_grpc.RecommenderStub(ch) for ch in channels]
        events = [recommender_pb2.Event(user_id="multi-process-user", item_id=item, behavior="buy", timestamp=end + n) for n, item in enumerate(items)]
        assert stubs[0].LogEvents(recommender_pb2.LogEventsRequest(events=events), timeout=30).accepted == len(items)
        # k covers the catalogue: a process that did not see the buys would return them among the rest.
        recommend = lambda stub, seen: {
            r.item_id for r in stub.Recommend(recommender_pb2.RecommendRequest(user_id="multi-process-user", k=1000, include_seen=seen), timeout=30).items
        }
        assert recommend(stubs[0], True) & set(items)
        for stub in stubs:  # whichever process each connection landed on, it sees the logged buys
            assert not recommend(stub, False) & set(items)
    finally:
        for channel in channels:
            channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log_path.read_text()
    assert "started 2 server processes" in log_path.read_text()


@pytest.mark.slow
def test_the_queries_of_one_connection_are_computed_by_both_processes(tiny_bundle, unused_port, tmp_path):
    # One connection reaches one process; the engines share its queries all the same (server.peers).
    metrics_port = _port_pair()
    log_path = tmp_path / "serve.log"
    args = [
        "--bundle", tiny_bundle, "--host", "127.0.0.1", "--port", str(unused_port), "--processes", "2", "--event-log", str(tmp_path / "events.db"),
        "--watch-interval", "0", "--metrics-port", str(metrics_port),
    ]
    proc = _serve(args, log_path)
    addr = f"127.0.0.1:{unused_port}"
    ports = (metrics_port, metrics_port + 1)
    channel = None
    try:
        _wait_serving(proc, addr, log_path)
        _wait_metrics(ports, log_path)
        user = str(Engine.load(tiny_bundle).bundle.data.users.decode([1])[0])
        channel = grpc.insecure_channel(addr)
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        for _ in range(5):  # bursts until the busy process has handed some over (the first usually does)
            calls = [stub.Recommend.future(recommender_pb2.RecommendRequest(user_id=user, k=10), timeout=60) for _ in range(64)]
            answers = {tuple(r.item_id for r in call.result().items) for call in calls}
            assert len(answers) == 1  # computed here or by the peer, the same answer
            if max(_metric(p, "funnel_requests_forwarded_total") for p in ports) > 0:
                break
        forwarded = sorted(_metric(p, "funnel_requests_forwarded_total") for p in ports)
        assert forwarded[0] == 0 and forwarded[1] > 0, forwarded  # only the process holding the connection hands queries over
        assert all(_metric(p, "funnel_batch_size_count") > 0 for p in ports)  # and both computed
    finally:
        if channel is not None:
            channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log_path.read_text()


def _wait_metrics(ports, log_path) -> None:
    """Wait until every port serves Prometheus metrics."""
    for port in ports:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                assert b"funnel_" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)


def _metric(port: int, name: str) -> float:
    """The sum of sample ``name`` over its labels, read from the metrics endpoint at ``port``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples if sample.name == name)


@pytest.mark.slow
def test_servers_stop_when_their_parent_is_killed(tiny_bundle, unused_port, tmp_path):
    # kill -9 of `funnel serve` must not leave orphan servers holding the port.
    log_path = tmp_path / "serve.log"
    args = [
        "--bundle", tiny_bundle, "--host", "127.0.0.1", "--port", str(unused_port), "--processes", "2", "--event-log", str(tmp_path / "events.db"),
        "--watch-interval", "0", "--no-pin-cores",
    ]
    proc = _serve(args, log_path)
    try:
        _wait_serving(proc, f"127.0.0.1:{unused_port}", log_path)
        children = _children(proc.pid)
        assert len(children) == 2
        assert all(os.sched_getaffinity(pid) == os.sched_getaffinity(0) for pid in children)  # --no-pin-cores: the scheduler places them
    finally:
        proc.kill()
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in children):
        assert time.monotonic() < deadline, "server processes outlived their parent"
        time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
