"""Acknowledged events survive ``kill -9``: a real ``funnel serve`` process, killed and restarted on its event log."""

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from funnel.events.eventlog import UserEvent
from funnel.server.engine import Engine
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc
from funnel.server.state import open_state
from funnel.tools.recommend import wait_ready

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 120.0
N_EVENTS = 1000
N_CALLS = 10
USERS = [f"durable-{u}" for u in range(5)]


class ServeProcess:
    """``python -m funnel.tools serve`` on a free port, its log in a file."""

    def __init__(self, bundle: str, event_log: str, log_path: str):
        self.log_path = log_path
        self._log = open(log_path, "w")
        cmd = [sys.executable, "-m", "funnel.tools", "serve", "--bundle", bundle, "--host", "127.0.0.1", "--port", "0",
               "--event-log", event_log, "--watch-interval", "0", "--workers", "4"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        port = self._wait_for(r"serving .* on 127\.0\.0\.1:(\d+)")
        self.addr = f"127.0.0.1:{port}"
        wait_ready(self.addr, timeout=START_TIMEOUT_S)

    def log_text(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()

    def _wait_for(self, pattern: str) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log_text())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.1)
        pytest.fail(f"server did not log /{pattern}/ within {START_TIMEOUT_S:.0f} s:\n{self.log_text()}")

    def stop(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self._log.close()


def sent_events(engine: Engine) -> list[recommender_pb2.Event]:
    """1,000 events over a few new users: mostly bundle items, every tenth an item no bundle has."""
    data = engine.bundle.data
    rng = np.random.default_rng(0)
    items = data.items.decode(rng.integers(1, data.items.size, N_EVENTS))
    end = int(data.seqs.ts.max())
    return [
        recommender_pb2.Event(
            user_id=USERS[n % len(USERS)],
            item_id=f"future-item-{n}" if n % 10 == 9 else str(items[n]),
            category_id="future-category" if n % 10 == 9 else "",
            behavior=("pv", "pv", "cart", "buy")[n % 4],
            timestamp=end + n,
        )
        for n in range(N_EVENTS)
    ]


@pytest.mark.slow
def test_acknowledged_events_survive_kill_9(tiny_bundle, tmp_path):
    event_log = str(tmp_path / "events.db")
    engine = Engine.load(tiny_bundle)
    events = sent_events(engine)

    first = ServeProcess(tiny_bundle, event_log, str(tmp_path / "first.log"))
    try:
        with grpc.insecure_channel(first.addr) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            per_call = N_EVENTS // N_CALLS
            for c in range(N_CALLS):
                response = stub.LogEvents(recommender_pb2.LogEventsRequest(events=events[c * per_call : (c + 1) * per_call]), timeout=30)
                assert response.accepted == per_call
    finally:
        # No graceful shutdown: whatever was acknowledged must already be on disk.
        first.stop(signal.SIGKILL)
    assert first.proc.returncode == -signal.SIGKILL

    second = ServeProcess(tiny_bundle, event_log, str(tmp_path / "second.log"))
    try:
        # The restarted server's state, as it reports it after replay.
        assert re.search(rf"replayed {N_EVENTS} events from .*: {len(USERS)} users, {N_EVENTS} events held", second.log_text()), second.log_text()
        with grpc.insecure_channel(second.addr) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            recommend = lambda user, seen: {
                r.item_id for r in stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=1000, include_seen=seen), timeout=30).items
            }
            for user in USERS:
                logged = {e.item_id for e in events if e.user_id == user}
                # k covers the whole catalogue, so leaving out seen items removes exactly the items the state holds.
                everything = recommend(user, True)
                assert logged & everything
                assert recommend(user, False) == everything - logged
    finally:
        second.stop(signal.SIGTERM)

    # Every field of every event, in order, as the next start would replay it.
    state = open_state("memory", event_log=event_log, max_events_per_user=N_EVENTS)
    for user in USERS:
        expected = [UserEvent(e.user_id, e.item_id, e.category_id, e.behavior, e.timestamp) for e in events if e.user_id == user]
        got = list(state.recent(user))
        known = {e.item_id for e in expected} & set(engine.bundle.data.items.decode(np.arange(1, engine.bundle.data.items.size)))
        # The server filled in the bundle's category for known items sent without one.
        assert [(e.item_id, e.behavior, e.timestamp) for e in got] == [(e.item_id, e.behavior, e.timestamp) for e in expected]
        assert all(e.category_id for e in got if e.item_id in known)
        assert [e.category_id for e in got if e.item_id not in known] == ["future-category"] * sum(e.item_id not in known for e in expected)
    state.close()
