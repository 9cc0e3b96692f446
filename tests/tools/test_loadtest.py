"""``funnel loadtest``: summary statistics by hand, a short real run, open-loop queueing, the CLI."""

import json
import math
import time
from concurrent.futures import Future

import numpy as np
import pytest

from funnel.server.app import ServerOptions, build_server
from funnel.server.holder import EngineHolder
from funnel.server.query import RecommendResult, Recommendation
from funnel.tools.cli import build_parser
from funnel.tools.loadtest import WARMUP_CALLS, human_summary, loadtest, one_at_a_time, open_loop, ramp, summarize, version_report


def test_summarize_on_hand_computed_latencies():
    latency = np.array([0.001, 0.004, 0.002, 0.003, np.nan])
    codes = ["OK", "OK", "UNAVAILABLE", "OK", None]
    got = summarize(latency, codes, elapsed_s=2.0)
    assert got["sent"] == 5 and got["ok"] == 3
    assert got["achieved_qps"] == 1.5
    assert got["p50_ms"] == 2.5  # median of 1, 2, 3, 4 ms (errors count: a fast failure must not hide)
    assert math.isclose(got["p90_ms"], 3.7) and math.isclose(got["p99_ms"], 3.97) and got["max_ms"] == 4.0
    assert got["errors"] == {"NO_RESPONSE": 1, "UNAVAILABLE": 1}


def test_summarize_with_nothing_completed():
    got = summarize(np.array([np.nan]), [None], elapsed_s=0.0)
    assert got["p50_ms"] is None and got["achieved_qps"] == 0.0 and got["errors"] == {"NO_RESPONSE": 1}


def test_version_report_counts_and_spans():
    counts, spans = version_report(np.array([0.0, 0.5, 1.0, 1.5]), ["a", "a", None, "b"])
    assert counts == {"a": 2, "b": 1}
    assert spans == {"a": [0.0, 0.5], "b": [1.5, 1.5]}


class SleepyEngine:
    """Answers after ``seconds``, one request at a time."""

    model_version = index_version = "sleepy-1"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def recommend(self, query):
        time.sleep(self.seconds)
        return RecommendResult([Recommendation("i1", 1.0, 1.0, "popular")] * query.k, self.model_version, self.index_version, {})


def serve(engine, **options):
    built = build_server("127.0.0.1:0", holder=EngineHolder(engine), options=ServerOptions(**options))
    built.server.start()
    return built, f"127.0.0.1:{built.port}"


def test_short_run_reports_every_key_and_writes_json(tmp_path):
    built, addr = serve(SleepyEngine(0.0))
    out = tmp_path / "load.json"
    try:
        report = loadtest(addr=addr, qps=50, duration=1.0, concurrency=2, users=["u1", "u2"], items=["i1"], floor_duration=0.5,
                          log_events_fraction=0.2, json_out=str(out))
    finally:
        built.stop(None)
    assert json.loads(out.read_text()) == report
    for key in ("achieved_qps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "errors"):
        assert key in report and key in report["floor"]
    assert report["errors"] == {} and report["floor"]["errors"] == {} and report["floor"]["sent"] == 25
    lag = report["client_lag_ms"]  # how late the client sent its calls depends on the host, so only its shape is checked here
    assert set(lag) == {"p50_ms", "p99_ms", "max_ms"} and 0 <= lag["p50_ms"] <= lag["p99_ms"] <= lag["max_ms"]
    mixed = report["log_events"]
    assert report["sent"] + mixed["sent"] == 50 and mixed["sent"] > 0
    assert mixed["errors"] == {"FAILED_PRECONDITION": mixed["sent"]}  # this engine keeps no user state
    assert report["model_versions"] == {"sleepy-1": report["sent"]}
    assert report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
    summary = human_summary(report).splitlines()
    assert summary[0].startswith(f"offered 50/s for 1 s: {report['ok']} of {report['sent']} answered") and "errors: none" in summary[0]
    assert summary[1].startswith("health-check floor") and summary[2].startswith(f"LogEvents: {mixed['sent']} sent")


def _answered(i: int) -> Future:
    fut = Future()
    fut.set_result(i)
    return fut


def test_a_client_that_cannot_keep_its_schedule_shows_its_lag():
    # 100 calls due 5 ms apart, but sending each takes 15 ms: call i goes out about 10 * i ms late.
    slow = lambda i: (time.sleep(0.015), _answered(i))[1]
    phase = open_loop(slow, qps=200, duration_s=0.5, timeout_s=1.0)
    assert phase.codes == ["OK"] * 100
    assert phase.send_lag_s[-1] > 0.5 and np.all(np.diff(phase.send_lag_s) > 0)
    assert np.all(phase.latency_s >= phase.send_lag_s)  # the lag is part of every latency
    prompt = open_loop(_answered, qps=200, duration_s=0.5, timeout_s=1.0)
    # Compared with the slow client in the same run, not with a fixed bound: a shared host may stall any client briefly.
    assert np.nanpercentile(prompt.send_lag_s, 50) < np.nanpercentile(phase.send_lag_s, 50) / 10


def test_the_summary_flags_a_client_that_fell_behind():
    report = {"ok": 10, "sent": 10, "achieved_qps": 10.0, "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0, "errors": {}, "load": {"qps": 10, "duration_s": 1}}
    on_time = dict(report, client_lag_ms={"p50_ms": 0.2, "p99_ms": 1.0, "max_ms": 2.0})
    behind = dict(report, client_lag_ms={"p50_ms": 40.0, "p99_ms": 250.0, "max_ms": 300.0})
    assert "warning" not in human_summary(on_time) and "warning" not in human_summary(report)
    assert "fell behind its own schedule (calls sent late by p99 250.0 ms, max 300.0 ms)" in human_summary(behind)


def test_latency_counts_from_the_scheduled_time_so_queueing_shows():
    # 20 arrivals in 1 s at a server that does 10 per second: the last ones wait about a second.
    built, addr = serve(SleepyEngine(0.1), max_workers=1, max_batch=1)
    try:
        report = loadtest(addr=addr, qps=20, duration=1.0, concurrency=1, users=["u"], floor_duration=0, timeout=10.0)
    finally:
        built.stop(None)
    assert report["errors"] == {} and report["floor"] is None
    assert report["max_ms"] > 5 * 100  # a closed loop would report about 100 ms per call
    assert report["achieved_qps"] < 20


def test_ramp_stops_at_the_first_rate_the_server_cannot_hold(tmp_path):
    # One request at a time, 25 ms each: about 40/s. 10/s and 20/s hold a 300 ms p99; 60/s queues past it.
    built, addr = serve(SleepyEngine(0.025), max_workers=1, max_batch=1)
    out = tmp_path / "ramp.json"
    try:
        report = ramp(addr=addr, users=["u"], concurrency=1, start_qps=10, step_qps=10, max_qps=200, step_duration=1.5, p99_limit_ms=300, timeout=10.0, json_out=str(out))
    finally:
        built.stop(None)
    assert json.loads(out.read_text()) == report
    held = [s["qps"] for s in report["steps"] if s["held"]]
    assert held == [10 * (i + 1) for i in range(len(held))] and report["highest_qps_held"] == held[-1]
    assert 20 <= report["highest_qps_held"] < 60 and not report["steps"][-1]["held"]


class TimedEngine(SleepyEngine):
    """Sleeps, reports fixed stage timings, and counts its calls."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.calls = 0

    def recommend(self, query):
        self.calls += 1
        result = super().recommend(query)
        return RecommendResult(result.items, self.model_version, self.index_version, {"total": 3000, "recall": 1000, "rank": 2000})


def test_one_at_a_time_reports_the_client_the_engine_and_the_floor(tmp_path):
    engine = TimedEngine(0.02)
    built, addr = serve(engine)
    out = tmp_path / "lone.json"
    try:
        report = one_at_a_time(addr=addr, calls=10, gap_ms=1, users=["u1", "u2"], json_out=str(out))
    finally:
        built.stop(None)
    assert json.loads(out.read_text()) == report
    assert engine.calls == 10 + WARMUP_CALLS  # one at a time, warm-up first
    assert report["sent"] == report["ok"] == 10 and report["errors"] == {} and report["floor"]["ok"] == 10
    assert report["engine_ms"] == {"total": 3.0, "recall": 1.0, "rank": 2.0}
    assert 20 <= report["p50_ms"] <= report["p90_ms"] <= report["max_ms"]  # each call waits for the 20 ms engine
    assert report["floor"]["p50_ms"] < report["p50_ms"] and report["p50_over_floor_p50"] > 1
    with pytest.raises(ValueError, match="calls"):
        one_at_a_time(addr=addr, calls=0, users=["u"])


def test_one_at_a_time_and_ramp_are_refused_together(capsys):
    from funnel.tools.loadtest import run

    args = build_parser().parse_args(["loadtest", "--users-from", "e.csv", "--one-at-a-time", "5", "--gap-ms", "2", "--ramp"])
    assert (args.one_at_a_time, args.gap_ms) == (5, 2.0)
    assert run(args) == 2 and "two different measurements" in capsys.readouterr().err


def test_cli_registers_loadtest_and_checks_its_inputs():
    args = build_parser().parse_args(["loadtest", "--addr", "h:1", "--qps", "200", "--duration", "60", "--concurrency", "8", "--users-from", "e.csv", "--json", "o.json"])
    assert (args.addr, args.qps, args.duration, args.concurrency, args.users_from, args.json_out) == ("h:1", 200.0, 60.0, 8, "e.csv", "o.json")
    args = build_parser().parse_args(["loadtest", "--users-from", "e.csv", "--ramp", "--ramp-step", "50", "--p99-limit-ms", "20"])
    assert (args.ramp, args.ramp_step, args.p99_limit_ms) == (True, 50.0, 20.0)
    with pytest.raises(ValueError, match="ramp needs"):
        ramp(addr="h:1", users=["u"], start_qps=10, step_qps=0)
    with pytest.raises(ValueError, match="users-from"):
        loadtest(addr="h:1")
    with pytest.raises(ValueError, match="qps"):
        loadtest(addr="h:1", qps=0, users=["u"])


def test_users_and_items_come_from_the_log(tiny_log_path):
    from funnel.events.readers import read_events
    from funnel.tools.loadtest import load_users

    events = read_events(tiny_log_path).events
    users, items = load_users(tiny_log_path, limit=20)
    assert len(users) == 20 == len(set(users)) and set(users) <= set(events["user"].astype(str))
    assert len(items) == 20 == len(set(items)) and set(items) <= set(events["item"].astype(str))


class RecordingEngine(SleepyEngine):
    """Keeps the users of logged events (an engine with a state)."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.state, self.logged = object(), []

    def log_events(self, events) -> int:
        self.logged.extend(e.user_id for e in events)
        return 0


@pytest.mark.parametrize("real", [False, True])
def test_mixed_load_logs_for_synthetic_users_unless_told(real):
    engine = RecordingEngine()
    built, addr = serve(engine)
    try:
        report = loadtest(addr=addr, qps=40, duration=0.5, concurrency=1, users=["u1", "u2"], items=["i1"], floor_duration=0,
                          log_events_fraction=0.5, log_events_to_real_users=real)
    finally:
        built.stop(None)
    assert report["log_events"]["sent"] > 0 and report["log_events"]["errors"] == {}
    assert set(engine.logged) <= ({"u1", "u2"} if real else {"loadtest:u1", "loadtest:u2"}) and engine.logged


def test_nothing_listening_is_one_line_and_exit_2(tmp_path, capsys):
    import socket

    log = tmp_path / "log.csv"
    log.write_text("1,10,100,pv,1700000000\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        args = build_parser().parse_args(["loadtest", "--addr", f"127.0.0.1:{port}", "--qps", "1", "--duration", "1", "--users-from", str(log)])
        assert args.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: nothing answered at 127.0.0.1:{port} within 5 s") and err.count("\n") == 1


def test_request_files_are_framed_requests_one_user_each(tmp_path):
    from funnel.server.rpc import recommender_pb2
    from funnel.tools.loadtest import write_request_files

    paths = write_request_files(out_dir=str(tmp_path / "reqs"), count=3, users=["u1", "u2", "u3", "u4"], k=7)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["recommend-0.bin", "recommend-1.bin", "recommend-2.bin", "health.bin"]
    bodies = [open(p, "rb").read() for p in paths]
    for body in bodies:  # flag byte 0 (not compressed), then the payload's length, big-endian
        assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5
    requests = [recommender_pb2.RecommendRequest.FromString(body[5:]) for body in bodies[:3]]
    assert {r.k for r in requests} == {7} and len({r.user_id for r in requests}) == 3 and {r.user_id for r in requests} <= {"u1", "u2", "u3", "u4"}
    assert bodies[3] == b"\x00\x00\x00\x00\x00"  # an empty HealthCheckRequest
    assert len(write_request_files(out_dir=str(tmp_path / "few"), count=5, users=["u1"])) == 6  # users repeat when there are fewer
    with pytest.raises(ValueError, match="count"):
        write_request_files(out_dir=str(tmp_path / "none"), count=0, users=["u1"])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        write_request_files(out_dir=str(tmp_path / "a-file"), users=["u1"])


def test_cli_writes_request_files_and_sends_nothing(tmp_path, tiny_log_path, capsys):
    out = tmp_path / "reqs"
    args = build_parser().parse_args(["loadtest", "--addr", "127.0.0.1:1", "--users-from", tiny_log_path, "--write-requests", str(out), "--request-files", "2"])
    assert args.run(args) == 0  # nothing listens at port 1: the files need no server
    printed = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["health.bin", "recommend-0.bin", "recommend-1.bin"]
    assert printed.out.splitlines() == [str(out / "recommend-0.bin"), str(out / "recommend-1.bin"), str(out / "health.bin")]
    assert f"-d {out / 'recommend-0.bin'}" in printed.err and "http://127.0.0.1:1/funnel.v1.Recommender/Recommend" in printed.err
    args = build_parser().parse_args(["loadtest", "--users-from", tiny_log_path, "--write-requests", str(out), "--ramp"])
    assert args.run(args) == 2 and "sends nothing" in capsys.readouterr().err
