"""Work sharing between server processes (:mod:`server.peers`), two linked ends in one process.

The ends are the ones :func:`link_processes` makes for forked processes; here both stay
in this process, each with its own micro-batcher, which is what a forked process has.
The real processes are tested in ``test_processes.py``.
"""

import asyncio
import threading
import time

import pytest

from funnel.server.batching import MicroBatcher, Overloaded
from funnel.server.peers import PeerUnavailable, link_processes


def _batcher(name: str, gate: threading.Event | None = None, **kwargs) -> MicroBatcher:
    """A batcher answering ``"<name>:<item>"``, or the item itself when it is an exception; waits on ``gate`` first when given."""

    def run(items: list) -> list:
        if gate is not None:
            gate.wait(10)
        return [item if isinstance(item, Exception) else f"{name}:{item}" for item in items]

    return MicroBatcher(run, max_wait_s=0, **kwargs)


@pytest.fixture
def linked():
    """Process 0's and process 1's :class:`Peers`, each started on its own batcher; closed afterwards."""
    a, b = link_processes(2)
    batchers = [_batcher("zero", on_load=a.publish), _batcher("one", on_load=b.publish)]
    a.start(batchers[0])
    b.start(batchers[1])
    yield a, b, batchers
    for p in (a, b):
        p.close()
    for batcher in batchers:
        batcher.close()


def test_a_forwarded_query_runs_on_the_peers_batcher_and_its_answer_comes_back(linked):
    a, b, _ = linked
    assert asyncio.run(a.forward(1, "q", None)) == "one:q"
    assert asyncio.run(b.forward(0, "r", time.monotonic() + 5)) == "zero:r"


def test_the_peers_errors_reach_the_asker_as_they_would_locally(linked):
    a, _, _ = linked
    with pytest.raises(ValueError, match="bad item"):
        asyncio.run(a.forward(1, ValueError("bad item"), None))


def test_an_answer_that_cannot_be_sent_back_still_ends_the_wait(linked):
    a, _, batchers = linked
    batchers[1].run_batch = lambda items: [threading.Lock() for _ in items]  # a lock cannot be pickled
    with pytest.raises(RuntimeError, match="could not be sent back"):
        asyncio.run(asyncio.wait_for(a.forward(1, "q", None), 10))


def test_a_peer_that_refuses_on_arrival_says_why(linked):
    a, _, batchers = linked
    batchers[1].max_queue = 0
    with pytest.raises(Overloaded):
        asyncio.run(a.forward(1, "q", None))


def test_a_stopping_peer_sends_the_query_back_to_be_computed_locally(linked):
    a, _, batchers = linked
    batchers[1].close()
    with pytest.raises(PeerUnavailable, match="stopping"):
        asyncio.run(a.forward(1, "q", None))


def test_queries_out_fail_when_the_peer_goes_away_and_it_is_picked_no_more(linked):
    a, b, batchers = linked
    gate = threading.Event()
    batchers[1].run_batch = _batcher("one", gate).run_batch  # the peer holds the query without answering

    async def ask() -> None:
        task = asyncio.ensure_future(a.forward(1, "q", None))
        await asyncio.sleep(0.2)
        b.close()  # as when the peer process dies: its end of the link closes
        with pytest.raises(PeerUnavailable, match="stopped"):
            await asyncio.wait_for(task, 10)

    asyncio.run(ask())
    gate.set()
    assert a.pick(5) is None


def test_pick_chooses_a_less_loaded_peer_and_keeps_a_lone_query():
    peers = link_processes(3)
    try:
        p = peers[0]
        assert p.pick(0) is None  # idle here: a hand-off would only cost
        p.loads[1], p.loads[2] = 3, 1
        assert p.pick(1) is None  # no peer has less than this process
        assert p.pick(2) == 2
        assert p.pick(9) == 2
        p._sent[2] = 3  # queries already sent to process 2 and not answered count as its load
        assert p.pick(9) == 1
    finally:
        for q in peers:
            q.close()


def test_the_batcher_publishes_its_load_as_it_changes():
    seen = []
    gate = threading.Event()
    batcher = _batcher("x", gate, on_load=seen.append)
    try:
        futures = [batcher.submit(i) for i in range(3)]
        deadline = time.monotonic() + 10
        while batcher.load != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.load == 3  # one computing, two queued
        gate.set()
        assert [f.result(10) for f in futures] == ["x:0", "x:1", "x:2"]
        deadline = time.monotonic() + 10
        while (batcher.load or seen[-1]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.load == 0 and seen[-1] == 0
        assert max(seen) >= 2
    finally:
        batcher.close()
