"""``funnel loadtest``: open-loop load on a running server, with the transport floor measured beside it.

Open loop: request ``i`` is due at ``start + i / qps`` whatever happened to earlier
ones, and its latency is measured from that due time, so a server that falls behind
shows its queueing in the latency instead of slowing the load down. After the
Recommend phase a health check (``grpc.health.v1.Health/Check``, no work behind it)
runs at the same rate through the same channels: its figures (``floor``) are the
latency of the transport and of this client on this machine, so Recommend latency
can be read as a ratio to it.

``--ramp`` steps the offered rate instead (one open-loop run per step, no floor) until
p99 passes ``--p99-limit-ms`` or errors appear, and reports the highest rate that held.

``--one-at-a-time N`` measures a lone request instead: N blocking Recommend calls, each
sent ``--gap-ms`` after the previous one answered, then N health checks the same way;
it reports the client's percentiles, the engine's own time from the responses, and the
health-check floor (see :func:`one_at_a_time`).

``--write-requests DIR`` sends nothing: it writes request bodies for a load client
written in another language that sends a fixed HTTP/2 body (``h2load``), so a load
can be offered without this client's own CPU cost on the server's cores (see
:func:`write_request_files`).

The JSON report: ``achieved_qps``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms``,
``errors`` (status name -> count), ``model_versions`` (model_version -> responses)
and ``model_version_spans`` (model_version -> [first, last] due time in seconds
from the start), ``floor`` (the same latency keys for the health check),
``client_lag_ms`` (how late this client sent its calls: ``p50_ms``, ``p99_ms``,
``max_ms``; a client short of CPU falls behind and its latencies then include that
delay, which the summary flags), the load settings, and ``log_events`` for a mixed load.
"""

import argparse
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc
from funnel.tools.output import write_bytes, write_json

log = logging.getLogger("funnel.loadtest")

# How long past the last due time stragglers are waited for, beyond the call timeout.
DRAIN_SLACK_S = 1.0


@dataclass
class Phase:
    """Per-call records of one open-loop run.

    Attributes:
        due_s: [N] due time of each call, seconds from the start.
        latency_s: [N] completion minus due time (NaN: never completed).
        codes: status name per call (``None``: never completed).
        versions: model_version per successful Recommend call.
        elapsed_s: from the start to the last completion.
        send_lag_s: [N] when each call was actually sent minus its due time (NaN: not
            sent): how far this client fell behind its own schedule.
    """

    due_s: np.ndarray
    latency_s: np.ndarray
    codes: list
    versions: list
    elapsed_s: float = 0.0
    send_lag_s: np.ndarray | None = None


def open_loop(start_call: Callable[[int], grpc.Future], *, qps: float, duration_s: float, timeout_s: float, version_of=None) -> Phase:
    """Start call ``i`` at ``i / qps`` seconds for ``duration_s`` seconds and record how each one ended.

    Args:
        start_call: starts call ``i`` and returns its future (``stub.Method.future``).
        qps: arrival rate.
        duration_s: length of the arrival schedule.
        timeout_s: the calls' own deadline; stragglers are waited for this long.
        version_of: maps a response to the model_version it reports (``None``: not recorded).

    Returns:
        The per-call records.
    """
    n = max(int(round(qps * duration_s)), 1)
    due = np.arange(n) / qps
    latency = np.full(n, np.nan)
    sent = np.full(n, np.nan)
    codes: list = [None] * n
    versions: list = [None] * n
    pending = [n]
    last_done = [0.0]
    lock = threading.Lock()
    all_done = threading.Event()
    start = time.perf_counter() + 0.05

    def finished(i: int, fut: grpc.Future) -> None:
        now = time.perf_counter()
        latency[i] = now - start - due[i]
        try:
            response = fut.result()
            codes[i] = "OK"
            if version_of is not None:
                versions[i] = version_of(response)
        except grpc.RpcError as err:
            codes[i] = err.code().name
        except Exception as err:  # noqa: BLE001 - a client-side failure is an error of this call
            codes[i] = type(err).__name__
        with lock:
            last_done[0] = max(last_done[0], now - start)
            pending[0] -= 1
            if pending[0] == 0:
                all_done.set()

    for i in range(n):
        delay = start + due[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent[i] = time.perf_counter() - start
        try:
            fut = start_call(i)
        except Exception as err:  # noqa: BLE001 - recorded as this call's error
            codes[i] = type(err).__name__
            with lock:
                pending[0] -= 1
                if pending[0] == 0:
                    all_done.set()
            continue
        fut.add_done_callback(lambda f, i=i: finished(i, f))
    all_done.wait(timeout_s + DRAIN_SLACK_S)
    return Phase(due, latency, codes, versions, elapsed_s=last_done[0], send_lag_s=sent - due)


def summarize(latency_s: np.ndarray, codes: list, elapsed_s: float) -> dict:
    """Latency percentiles over completed calls and error counts.

    Args:
        latency_s: [N] seconds from due time to completion (NaN: not completed).
        codes: status name per call, ``None`` for calls that never completed.
        elapsed_s: seconds from the start to the last completion.

    Returns:
        ``sent``, ``ok``, ``achieved_qps`` (OK calls per elapsed second), ``p50_ms``,
        ``p90_ms``, ``p99_ms``, ``max_ms`` over every completed call (errors
        included: a fast error must not hide), ``errors`` by status name (calls that
        never completed count as ``NO_RESPONSE``).
    """
    ok = sum(1 for c in codes if c == "OK")
    errors = Counter("NO_RESPONSE" if c is None else c for c in codes if c != "OK")
    return {
        "sent": len(codes),
        "ok": ok,
        "achieved_qps": round(ok / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        **_percentiles_ms(latency_s, (50, 90, 99)),
        "errors": dict(sorted(errors.items())),
    }


def _percentiles_ms(seconds: np.ndarray, percentiles: tuple[int, ...]) -> dict:
    """``p{q}_ms`` for each of ``percentiles`` and ``max_ms`` over the non-NaN ``seconds``, in ms to the microsecond; ``None`` when there are none."""
    done = seconds[~np.isnan(seconds)] * 1e3
    stats = {f"p{q}_ms": round(float(np.percentile(done, q)), 3) if len(done) else None for q in percentiles}
    stats["max_ms"] = round(float(done.max()), 3) if len(done) else None
    return stats


CLIENT_LAG_WARN_MS = 10.0
"""A run whose calls left this much (p99) behind their schedule is flagged: its latencies
include the client's own delay (a client short of CPU, e.g. on the server's cores)."""


def lag_report(send_lag_s: np.ndarray) -> dict:
    """``p50_ms``, ``p99_ms``, ``max_ms`` of how late calls were sent (see :attr:`Phase.send_lag_s`); ``None`` when none was sent."""
    return _percentiles_ms(send_lag_s, (50, 99))


def client_behind(report: dict) -> bool:
    """Whether the run's client fell behind its schedule by more than ``CLIENT_LAG_WARN_MS`` (p99)."""
    lag = (report.get("client_lag_ms") or {}).get("p99_ms")
    return lag is not None and lag > CLIENT_LAG_WARN_MS


def version_report(due_s: np.ndarray, versions: list) -> tuple[dict, dict]:
    """Responses per model_version and the [first, last] due time (s) at which each was seen."""
    counts: Counter = Counter()
    spans: dict[str, list[float]] = {}
    for t, v in zip(due_s, versions):
        if v is None:
            continue
        counts[v] += 1
        span = spans.setdefault(v, [float(t), float(t)])
        span[0], span[1] = min(span[0], float(t)), max(span[1], float(t))
    return dict(counts), {v: [round(a, 3), round(b, 3)] for v, (a, b) in spans.items()}


def load_users(path: str, fmt: str = "taobao", limit: int = 100_000, seed: int = 0) -> tuple[list[str], list[str]]:
    """User ids (a random sample of at most ``limit``) and item ids to draw requests from a behaviour log."""
    from funnel.events.readers import read_events

    events = read_events(path, fmt).events
    rng = np.random.default_rng(seed)
    users = events["user"].unique()
    items = events["item"].unique()
    pick = lambda a: [str(x) for x in (rng.choice(a, size=limit, replace=False) if len(a) > limit else a)]
    return pick(users), pick(items)


def _request_ids(users: list[str] | None, items: list[str] | None, users_from: str | None, fmt: str, seed: int) -> tuple[list[str], list[str] | None]:
    """The user (and item) ids requests draw from: as given, or sampled from ``users_from``."""
    if users is None:
        if users_from is None:
            raise ValueError("give --users-from EVENTS (or users=) to draw request users from")
        users, items = load_users(users_from, fmt, seed=seed)
    if not users:
        raise ValueError("no users to send requests for")
    return users, items


def grpc_frame(message) -> bytes:
    """``message`` as one uncompressed gRPC length-prefixed message: a flag byte of 0, the
    payload's length as 4 big-endian bytes, the serialized payload (the body of a unary call)."""
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def write_request_files(
    *, out_dir: str, count: int = 8, users_from: str | None = None, fmt: str = "taobao", users: list[str] | None = None, k: int = 10, seed: int = 0
) -> list[str]:
    """Write framed ``Recommend`` requests, one user each, and a framed health check, for a client that sends a fixed body.

    A client such as ``h2load`` sends the same bytes on every call of a connection, so
    each file stands for one user; run one such client per file to spread the load over
    several users and connections.

    Args:
        out_dir: the folder to write into (created if missing).
        count: request files to write, each for another user drawn at random (users
            repeat only when there are fewer than ``count``).
        users_from, fmt, users: where the request users come from (as :func:`loadtest`).
        k: items per Recommend.
        seed: seed for the user draws.

    Returns:
        The paths written: ``recommend-0.bin`` ... ``recommend-{count-1}.bin``, then
        ``health.bin`` (a ``grpc.health.v1.Health/Check`` request).

    Raises:
        ValueError: ``count`` below 1, ``out_dir`` a file, or no users.
    """
    if count < 1:
        raise ValueError(f"count (--request-files) must be >= 1, got {count}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a folder; give a folder for the request files")
    users, _ = _request_ids(users, None, users_from, fmt, seed)
    draw = np.random.default_rng(seed).choice(len(users), size=count, replace=count > len(users))
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"recommend-{i}.bin") for i in range(count)]
    for path, u in zip(paths, draw.tolist()):
        write_bytes(path, grpc_frame(recommender_pb2.RecommendRequest(user_id=users[u], k=k)))
    health = os.path.join(out_dir, "health.bin")
    write_bytes(health, grpc_frame(health_pb2.HealthCheckRequest()))
    return paths + [health]


def _channel(addr: str, tls_ca: str | None, i: int) -> grpc.Channel:
    # A channel of its own per slot: the local subchannel pool gives each one its own connection.
    options = [("grpc.use_local_subchannel_pool", 1), ("funnel.loadtest.slot", i)]
    if tls_ca is None:
        return grpc.insecure_channel(addr, options=options)
    with open(tls_ca, "rb") as fh:
        return grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=fh.read()), options=options)


CONNECT_TIMEOUT_S = 5.0
SYNTHETIC_USER_PREFIX = "loadtest:"
"""Mixed load logs its events for these users, never for real ones (unless asked to)."""


class Unreachable(ConnectionError):
    """No server answered at the load test's address."""


def _await_ready(channel: grpc.Channel, addr: str, tls_ca: str | None) -> None:
    """Wait for ``channel`` to connect; :class:`Unreachable`, with what to check, after ``CONNECT_TIMEOUT_S``."""
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        raise Unreachable(
            f"nothing answered at {addr} within {CONNECT_TIMEOUT_S:.0f} s: is 'funnel serve' running there "
            f"(check --addr{', and --tls-ca against a plaintext server' if tls_ca else ', and whether the server speaks TLS (--tls-ca)'})?"
        ) from None


def loadtest(
    *,
    addr: str,
    qps: float = 100.0,
    duration: float = 10.0,
    concurrency: int = 4,
    users_from: str | None = None,
    fmt: str = "taobao",
    users: list[str] | None = None,
    items: list[str] | None = None,
    k: int = 10,
    timeout: float = 2.0,
    floor_duration: float | None = None,
    log_events_fraction: float = 0.0,
    log_events_to_real_users: bool = False,
    token: str | None = None,
    tls_ca: str | None = None,
    seed: int = 0,
    json_out: str | None = None,
) -> dict:
    """Run the open-loop Recommend load, then the health-check floor at the same rate.

    Args:
        addr: the server, ``host:port``.
        qps: arrivals per second.
        duration: seconds of Recommend load.
        concurrency: client connections the calls are spread over (round robin).
        users_from: behaviour log whose users (and items) requests are drawn from.
        fmt: its format (``taobao``, ``movielens``, ``parquet``).
        users, items: the ids directly, instead of ``users_from``.
        k: items per Recommend.
        timeout: deadline of every call, seconds.
        floor_duration: seconds of health-check load (default ``duration``; 0 skips it).
        log_events_fraction: share of arrivals that are ``LogEvents`` of one event (mixed load).
        log_events_to_real_users: log those events for the sampled real users; by default
            they go to ``SYNTHETIC_USER_PREFIX + user``, so a load test never writes
            into real users' histories (which ``train --fold-events`` would learn).
        token: bearer token for ``LogEvents``.
        tls_ca: CA certificate (PEM) for a TLS server.
        seed: seed for the user and item draws.
        json_out: write the report here (atomically) as well.

    Returns:
        The report (see the module docstring).

    Raises:
        ValueError: neither ``users_from`` nor ``users``, or bad rates.
    """
    if qps <= 0 or duration <= 0 or concurrency < 1:
        raise ValueError(f"qps and duration must be > 0 and concurrency >= 1, got {qps}, {duration}, {concurrency}")
    if not 0 <= log_events_fraction < 1:
        raise ValueError(f"log_events_fraction must be in [0, 1), got {log_events_fraction}")
    users, items = _request_ids(users, items, users_from, fmt, seed)
    rng = np.random.default_rng(seed)
    n = max(int(round(qps * duration)), 1)
    user_draw = rng.integers(len(users), size=n)
    is_log = rng.random(n) < log_events_fraction if log_events_fraction and items else np.zeros(n, bool)
    item_draw = rng.integers(len(items), size=n) if items else None
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    run_id = uuid.uuid4().hex[:8]
    channels = [_channel(addr, tls_ca, i) for i in range(concurrency)]
    try:
        for ch in channels:
            _await_ready(ch, addr, tls_ca)
        stubs = [recommender_pb2_grpc.RecommenderStub(ch) for ch in channels]
        health_stubs = [health_pb2_grpc.HealthStub(ch) for ch in channels]

        def recommend(i: int) -> grpc.Future:
            stub = stubs[i % concurrency]
            user = users[user_draw[i]]
            if is_log[i]:
                log_user = user if log_events_to_real_users else SYNTHETIC_USER_PREFIX + user
                event = recommender_pb2.Event(user_id=log_user, item_id=items[item_draw[i]], behavior="pv", timestamp=int(time.time()))
                return stub.LogEvents.future(recommender_pb2.LogEventsRequest(events=[event]), timeout=timeout, metadata=metadata)
            request = recommender_pb2.RecommendRequest(user_id=user, k=k, request_id=f"lt-{run_id}-{i}")
            return stub.Recommend.future(request, timeout=timeout)

        version_of = lambda r: getattr(r, "model_version", None) or None
        floor_s = duration if floor_duration is None else floor_duration
        log.info(
            "Recommend: %.0f/s for %.0fs over %d connections%s", qps, duration, concurrency,
            f"; then the health-check floor (the transport's own latency) for {floor_s:.0f}s" if floor_s > 0 else "",
        )
        main = open_loop(recommend, qps=qps, duration_s=duration, timeout_s=timeout, version_of=version_of)
        floor = None
        if floor_s > 0:
            check = health_pb2.HealthCheckRequest(service="")
            log.info("health-check floor: %.0f/s for %.0fs", qps, floor_s)
            floor = open_loop(lambda i: health_stubs[i % concurrency].Check.future(check, timeout=timeout), qps=qps, duration_s=floor_s, timeout_s=timeout)
    finally:
        for ch in channels:
            ch.close()

    rec = ~is_log
    report = summarize(main.latency_s[rec], [c for c, r in zip(main.codes, rec) if r], main.elapsed_s)
    report["model_versions"], report["model_version_spans"] = version_report(main.due_s[rec], [v for v, r in zip(main.versions, rec) if r])
    report["client_lag_ms"] = lag_report(main.send_lag_s)
    if is_log.any():
        report["log_events"] = summarize(main.latency_s[is_log], [c for c, r in zip(main.codes, is_log) if r], main.elapsed_s)
    report["floor"] = summarize(floor.latency_s, floor.codes, floor.elapsed_s) if floor is not None else None
    if floor is not None and report["p99_ms"] is not None and report["floor"]["p99_ms"]:
        report["p99_over_floor_p99"] = round(report["p99_ms"] / report["floor"]["p99_ms"], 2)
    report["load"] = {
        "addr": addr, "qps": qps, "duration_s": duration, "concurrency": concurrency, "k": k, "timeout_s": timeout,
        "log_events_fraction": log_events_fraction, "users": len(users), "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if json_out:
        write_json(json_out, report)
    return report


WARMUP_CALLS = 20
"""Calls sent before a one-at-a-time run is measured (first connections, lazy imports, caches)."""


def one_at_a_time(
    *,
    addr: str,
    calls: int = 500,
    gap_ms: float = 10.0,
    users_from: str | None = None,
    fmt: str = "taobao",
    users: list[str] | None = None,
    k: int = 10,
    timeout: float = 2.0,
    tls_ca: str | None = None,
    seed: int = 0,
    json_out: str | None = None,
) -> dict:
    """A lone request's latency: blocking Recommend calls one after another, then health checks the same way.

    Each call is sent ``gap_ms`` after the previous one answered, so the server is idle
    when it arrives, as a request from a lightly loaded caller would find it. The health
    checks (no work behind them) measure the transport and this client on this machine.
    ``WARMUP_CALLS`` calls go first and are not counted.

    Args:
        addr: the server, ``host:port``.
        calls: measured Recommend calls, and as many health checks.
        gap_ms: idle time between an answer and the next call.
        users_from, fmt, users: where the request users come from (as :func:`loadtest`).
        k: items per Recommend.
        timeout: deadline of every call, seconds.
        tls_ca: CA certificate (PEM) for a TLS server.
        seed: seed for the user draws.
        json_out: write the report here (atomically) as well.

    Returns:
        ``sent``, ``ok``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms`` and ``errors``
        (as :func:`summarize`); ``engine_ms`` (``total``, ``recall``, ``rank``: medians of
        the stage timings the responses report); ``floor`` (the health checks' figures);
        ``p50_over_floor_p50``; the settings under ``load``.

    Raises:
        ValueError: bad settings, or no users.
        Unreachable: nothing answers at ``addr``.
    """
    if calls < 1 or gap_ms < 0:
        raise ValueError(f"calls must be >= 1 and gap_ms >= 0, got {calls}, {gap_ms}")
    users, _ = _request_ids(users, None, users_from, fmt, seed)
    draw = np.random.default_rng(seed).integers(len(users), size=calls + WARMUP_CALLS)
    channel = _channel(addr, tls_ca, 0)
    try:
        _await_ready(channel, addr, tls_ca)
        stub, health = recommender_pb2_grpc.RecommenderStub(channel), health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="")
        stages = np.full((calls, 3), np.nan)  # [calls, (total, recall, rank)] microseconds

        def recommend(i: int) -> None:
            response = stub.Recommend(recommender_pb2.RecommendRequest(user_id=users[draw[i]], k=k), timeout=timeout)
            if i >= WARMUP_CALLS:
                t = response.timings
                stages[i - WARMUP_CALLS] = (t.total_us, t.recall_us, t.rank_us)

        for i in range(WARMUP_CALLS):
            _blocking_call(lambda: recommend(i))
        main = _sequence(lambda i: recommend(WARMUP_CALLS + i), calls, gap_ms / 1e3)
        floor = _sequence(lambda i: health.Check(check, timeout=timeout), calls, gap_ms / 1e3)
    finally:
        channel.close()
    report = summarize(*main)
    del report["achieved_qps"]  # the calls are spaced on purpose: their rate says nothing
    engine = np.nanmedian(stages, axis=0) / 1e3 if not np.isnan(stages).all() else [None] * 3
    report["engine_ms"] = {name: None if v is None else round(float(v), 3) for name, v in zip(("total", "recall", "rank"), engine)}
    report["floor"] = summarize(*floor)
    del report["floor"]["achieved_qps"]
    if report["p50_ms"] is not None and report["floor"]["p50_ms"]:
        report["p50_over_floor_p50"] = round(report["p50_ms"] / report["floor"]["p50_ms"], 2)
    report["load"] = {
        "addr": addr, "calls": calls, "gap_ms": gap_ms, "k": k, "timeout_s": timeout, "users": len(users),
        "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if json_out:
        write_json(json_out, report)
    return report


def _blocking_call(call: Callable[[], object]) -> str:
    """Run one blocking call; its status name (``OK``, or the error's)."""
    try:
        call()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def _sequence(call: Callable[[int], object], n: int, gap_s: float) -> tuple[np.ndarray, list, float]:
    """``n`` blocking calls, each ``gap_s`` after the previous one ended: [n] latencies (s) from each call's
    own start, their status names, and the seconds the whole sequence took."""
    latency, codes = np.full(n, np.nan), [None] * n
    start = time.perf_counter()
    for i in range(n):
        if i:
            time.sleep(gap_s)
        sent = time.perf_counter()
        codes[i] = _blocking_call(lambda: call(i))
        latency[i] = time.perf_counter() - sent
    return latency, codes, time.perf_counter() - start


def ramp(
    *,
    start_qps: float = 100.0,
    step_qps: float = 100.0,
    max_qps: float = 10_000.0,
    step_duration: float = 10.0,
    p99_limit_ms: float = 50.0,
    max_error_share: float = 0.001,
    json_out: str | None = None,
    **load,
) -> dict:
    """Step the offered rate up until a step's p99 passes ``p99_limit_ms`` or its errors pass ``max_error_share``.

    Args:
        start_qps, step_qps, max_qps: the rates offered: ``start_qps``, then ``step_qps`` more each step, at most ``max_qps``.
        step_duration: seconds of load per step.
        p99_limit_ms: a step holds while its p99 is at most this.
        max_error_share: ... and while at most this share of its calls fail.
        json_out: write the report here (atomically) as well.
        load: the other :func:`loadtest` arguments (``addr``, ``users_from`` or ``users``, ...).

    Returns:
        ``highest_qps_held`` (``None`` when the first step failed), its step's
        ``achieved_qps`` and ``p99_ms``, the limits, and every step's report under ``steps``.
    """
    if step_qps <= 0 or start_qps <= 0 or max_qps < start_qps:
        raise ValueError(f"ramp needs start > 0, step > 0 and max >= start, got {start_qps}, {step_qps}, {max_qps}")
    steps, held = [], None
    qps = start_qps
    while qps <= max_qps:
        report = loadtest(qps=qps, duration=step_duration, floor_duration=0, **load)
        error_share = sum(report["errors"].values()) / max(report["sent"], 1)
        ok = report["p99_ms"] is not None and report["p99_ms"] <= p99_limit_ms and error_share <= max_error_share
        steps.append({"qps": qps, "held": ok, "error_share": round(error_share, 5), **report})
        log.info(
            "ramp: %.0f/s offered, %.0f/s answered, p99 %s ms, errors %.2f%%: %s%s", qps, report["achieved_qps"], report["p99_ms"], 100 * error_share, "held" if ok else "failed",
            f" (this client fell behind its schedule: send lag p99 {report['client_lag_ms']['p99_ms']:.1f} ms)" if client_behind(report) else "",
        )
        if not ok:
            break
        held = steps[-1]
        qps += step_qps
    out = {
        "highest_qps_held": held["qps"] if held else None,
        "achieved_qps": held["achieved_qps"] if held else None,
        "p99_ms": held["p99_ms"] if held else None,
        "p99_limit_ms": p99_limit_ms,
        "max_error_share": max_error_share,
        "step_duration_s": step_duration,
        "steps": steps,
    }
    if json_out:
        write_json(json_out, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--addr", default="localhost:50051", help="server address host:port (default: localhost:50051)")
    parser.add_argument("--qps", type=float, default=100.0, help="arrivals per second, on a fixed schedule (default: 100)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of Recommend load (default: 10)")
    parser.add_argument("--concurrency", type=int, default=4, help="client connections the calls are spread over (default: 4)")
    parser.add_argument("--users-from", required=True, metavar="EVENTS", help="behaviour log whose users (and items, for LogEvents) the requests use")
    parser.add_argument("--format", dest="fmt", default="taobao", help="format of --users-from: taobao, movielens or parquet (default: taobao)")
    parser.add_argument("--k", type=int, default=10, help="items per Recommend (default: 10)")
    parser.add_argument("--timeout", type=float, default=2.0, help="deadline of every call in seconds (default: 2)")
    parser.add_argument(
        "--floor-duration", type=float, default=None,
        help="seconds of health-check load after the Recommend load, at the same rate through the same channels: the transport's "
        "own latency, to compare Recommend's with; this is why a run takes about twice --duration (default: --duration; 0 skips it)",
    )
    parser.add_argument(
        "--log-events-fraction", type=float, default=0.0,
        help=f"share of arrivals sent as LogEvents of one event, for a mixed load; logged for users '{SYNTHETIC_USER_PREFIX}<user>' (default: 0)",
    )
    parser.add_argument(
        "--log-events-to-real-users", action="store_true",
        help="log the mixed load's events for the real users sampled, as live traffic would; they land in the server's event log, "
        "which 'funnel train --fold-events' learns from (default: a synthetic user per real one)",
    )
    parser.add_argument("--token", default=os.environ.get("FUNNEL_TOKEN"), help="bearer token for LogEvents (default: $FUNNEL_TOKEN)")
    parser.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify a TLS server; plaintext when omitted")
    parser.add_argument("--seed", type=int, default=0, help="seed for the user draws (default: 0)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the report to this JSON file")
    parser.add_argument(
        "--ramp", action="store_true",
        help="step the rate from --qps up by --ramp-step every --duration seconds until p99 passes --p99-limit-ms or more than "
        "0.1%% of calls fail; report the highest rate that held",
    )
    parser.add_argument("--ramp-step", type=float, default=100.0, help="rate added per ramp step (default: 100)")
    parser.add_argument("--ramp-max", type=float, default=10_000.0, help="highest rate a ramp offers (default: 10000)")
    parser.add_argument("--p99-limit-ms", type=float, default=50.0, help="p99 a ramp step must hold (default: 50)")
    parser.add_argument(
        "--one-at-a-time", type=int, default=None, metavar="N",
        help="measure a lone request instead of a load: N blocking Recommend calls, each --gap-ms after the previous answer, then N "
        "health checks the same way; reports the client's percentiles, the engine's own time and the health-check floor "
        "(ignores --qps, --duration, --concurrency)",
    )
    parser.add_argument(
        "--write-requests", default=None, metavar="DIR",
        help="send nothing: write --request-files framed Recommend requests (one user each) and a health check into DIR, for a load "
        "client that sends a fixed body, such as h2load (one client per file); prints an example command",
    )
    parser.add_argument("--request-files", type=int, default=8, help="with --write-requests: how many request files, one user each (default: 8)")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="with --one-at-a-time: idle milliseconds between an answer and the next call (default: 10)")


def human_summary(report: dict) -> str:
    """A few lines for a person, beside the JSON: what was offered, what came back, the floor."""
    ms = lambda v: "-" if v is None else f"{v:.1f} ms"
    errors = lambda counts: ", ".join(f"{n:,} {code}" for code, n in counts.items()) or "none"
    load = report.get("load", {})
    lines = [
        f"offered {load.get('qps', 0):g}/s for {load.get('duration_s', 0):g} s: {report['ok']:,} of {report['sent']:,} answered "
        f"({report['achieved_qps']:g}/s), p50 {ms(report['p50_ms'])}, p99 {ms(report['p99_ms'])}, max {ms(report['max_ms'])}; errors: {errors(report['errors'])}",
    ]
    floor = report.get("floor")
    if floor:
        lines.append(f"health-check floor (transport alone, same rate): p50 {ms(floor['p50_ms'])}, p99 {ms(floor['p99_ms'])}")
    mixed = report.get("log_events")
    if mixed:
        lines.append(f"LogEvents: {mixed['sent']:,} sent, p99 {ms(mixed.get('p99_ms'))}, errors: {errors(mixed['errors'])}")
    if client_behind(report):
        lag = report["client_lag_ms"]
        lines.append(
            f"warning: this client fell behind its own schedule (calls sent late by p99 {ms(lag['p99_ms'])}, max {ms(lag['max_ms'])}), so the "
            "latencies above include its delay: lower --qps, or run the load client on other cores than the server's"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except Unreachable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.write_requests is not None:
        if args.ramp or args.one_at_a_time is not None:
            print("error: --write-requests sends nothing; give it without --ramp and --one-at-a-time", file=sys.stderr)
            return 2
        paths = write_request_files(
            out_dir=args.write_requests, count=args.request_files, users_from=args.users_from, fmt=args.fmt, k=args.k, seed=args.seed
        )
        print("\n".join(paths))
        print(
            f"wrote {len(paths) - 1} Recommend requests and a health check; one h2load client per file, e.g. 100 calls a second for 30 s "
            f"with a {args.timeout:g} s deadline:\n  h2load -D 30 -c 1 -m 1024 --rps 100 -d {paths[0]} -H 'content-type: application/grpc' "
            f"-H 'te: trailers' -H 'grpc-timeout: {round(args.timeout * 1000)}m' http://{args.addr}/funnel.v1.Recommender/Recommend",
            file=sys.stderr,
        )
        return 0
    if args.one_at_a_time is not None:
        if args.ramp:
            print("error: --one-at-a-time and --ramp are two different measurements; give one", file=sys.stderr)
            return 2
        report = one_at_a_time(
            addr=args.addr, calls=args.one_at_a_time, gap_ms=args.gap_ms, users_from=args.users_from, fmt=args.fmt, k=args.k,
            timeout=args.timeout, tls_ca=args.tls_ca, seed=args.seed, json_out=args.json_out,
        )
        print(json.dumps(report, indent=2))
        engine, floor = report["engine_ms"], report["floor"]
        print(
            f"one at a time, {report['ok']:,} of {report['sent']:,} answered: p50 {report['p50_ms']} ms, p90 {report['p90_ms']} ms "
            f"(engine {engine['total']} ms: recall {engine['recall']}, rank {engine['rank']}); health check p50 {floor['p50_ms']} ms",
            file=sys.stderr,
        )
        return 0 if not report["errors"] else 1
    if args.ramp:
        report = ramp(
            start_qps=args.qps, step_qps=args.ramp_step, max_qps=args.ramp_max, step_duration=args.duration, p99_limit_ms=args.p99_limit_ms,
            json_out=args.json_out, addr=args.addr, concurrency=args.concurrency, users_from=args.users_from, fmt=args.fmt, k=args.k,
            timeout=args.timeout, log_events_fraction=args.log_events_fraction, log_events_to_real_users=args.log_events_to_real_users,
            token=args.token, tls_ca=args.tls_ca, seed=args.seed,
        )
        print(json.dumps({key: value for key, value in report.items() if key != "steps"}, indent=2))
        return 0 if report["highest_qps_held"] is not None else 1
    report = loadtest(
        addr=args.addr, qps=args.qps, duration=args.duration, concurrency=args.concurrency, users_from=args.users_from, fmt=args.fmt,
        k=args.k, timeout=args.timeout, floor_duration=args.floor_duration, log_events_fraction=args.log_events_fraction,
        log_events_to_real_users=args.log_events_to_real_users, token=args.token, tls_ca=args.tls_ca, seed=args.seed, json_out=args.json_out,
    )
    print(json.dumps(report, indent=2))
    print(human_summary(report), file=sys.stderr)
    return 0 if not report["errors"] else 1
