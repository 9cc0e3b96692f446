"""Sharing Recommend work between the server processes of one port: a busy process hands a query to an idle peer.

The kernel spreads connections over the processes (``SO_REUSEPORT``), not requests. A
client with one connection (a service with one channel; ``ghz`` by default) loads one
process while the others idle, and a few connections split unevenly (6 and 10 of 16 is
common), so the busier process saturates first. Each process still does the protocol
work of its own connections, but the engine work, most of a request, goes where there
is room: when this process's micro-batcher has work queued or running and a peer's has
less, the query goes to that peer over a Unix socket, the peer runs it in its own
micro-batcher (same deadline, same admission control) and sends the result back.

Each process publishes its batcher's load (queries queued or computing) in an array the
processes share; a process counts the queries it has sent a peer and not yet got back
as that peer's load too, so a burst does not all go to the one peer that looked idle.
The figures are read without locks: a decision may use a load a moment old, which
costs at most one query placed less well. A lone request is never forwarded: the
hand-off costs two pickles and two socket messages, more than an idle local batcher.

The links are anonymous socket pairs made by the parent and inherited through the fork,
so nothing outside the set of processes can reach them (they carry pickles).

A peer runs the query on the bundle it serves at that moment; during a swap two
processes may briefly serve different bundles, as they do anyway (the answer names its
versions). Events logged through any process are in the shared event store, so a
forwarded query sees them as a local one would.
"""

import asyncio
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
from collections.abc import Sequence

from funnel.server.batching import settle_soon

log = logging.getLogger(__name__)


class PeerUnavailable(Exception):
    """The peer a query was sent to stopped (or its link broke) before it answered; compute the query locally."""


class Peers:
    """One process's links to the other server processes of its port (built by :func:`link_processes`).

    Args:
        index: this process's number.
        links: peer number -> this process's end of the link to it.
        loads: the shared array of every process's published load.

    Call :meth:`start` with the local micro-batcher once it exists; from then on peers'
    queries run on it and :meth:`forward` may send local ones out.
    """

    def __init__(self, index: int, links: dict[int, multiprocessing.connection.Connection], loads: Sequence[int]):
        self.index = index
        self.links = links
        self.loads = loads
        self._send_locks = {j: threading.Lock() for j in links}
        self._sent = {j: 0 for j in links}  # peer -> queries sent and not yet answered (touched on the event loop only)
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future, int]] = {}
        self._tokens = itertools.count()
        self._alive = frozenset(links)  # replaced, never changed in place: pick() iterates it on another thread

    def publish(self, load: int) -> None:
        """Make this process's load (queries queued or computing here) visible to the others."""
        self.loads[self.index] = load

    def pick(self, local_load: int) -> int | None:
        """The peer to send a query to when this process has ``local_load`` queries queued or computing, or ``None`` to keep it.

        A peer qualifies when its load (published, plus what this process sent it and
        has not got back) is below ``local_load``; the least loaded one is chosen.
        """
        if local_load <= 0 or not self._alive:
            return None
        best, best_load = None, local_load
        for j in self._alive:
            load = self.loads[j] + self._sent[j]
            if load < best_load:
                best, best_load = j, load
        return best

    async def forward(self, peer: int, query, deadline: float | None):
        """Run ``query`` on ``peer``'s micro-batcher and return its result.

        Args:
            peer: from :meth:`pick`.
            query: a validated query.
            deadline: ``time.monotonic()`` value (the clock is the same in every process).

        Returns:
            What the peer's engine returned for the query.

        Raises:
            PeerUnavailable: the peer stopped before answering.
            Exception: whatever the peer's batcher raised for the query (a bad query,
                a passed deadline, an overload), as a local batcher would.
        """
        loop = asyncio.get_running_loop()
        token = next(self._tokens)
        future = loop.create_future()
        self._pending[token] = (loop, future, peer)
        self._sent[peer] += 1
        try:
            self._send(peer, ("query", token, query, deadline))
            return await future
        finally:
            self._pending.pop(token, None)
            self._sent[peer] -= 1

    def start(self, batcher) -> None:
        """Serve peers' queries on ``batcher`` (:class:`server.batching.MicroBatcher`) and take their answers, one thread per peer."""
        for j, link in self.links.items():
            threading.Thread(target=self._receive, args=(j, link, batcher), name=f"peer-{j}", daemon=True).start()

    def close(self) -> None:
        """Shut every link down and close it: the receiving threads here and the peers' ends see the link end, and queries still out fail with :class:`PeerUnavailable`."""
        for link in self.links.values():
            try:
                # close() alone would leave a receiving thread blocked in recv() holding the socket open.
                with socket.socket(fileno=os.dup(link.fileno())) as s:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed or shut down
        self._drop()

    def _drop(self) -> None:
        """Close this copy of the links only (another process's copies, inherited through the fork, stay up)."""
        for link in self.links.values():
            link.close()

    def _send(self, peer: int, message: tuple) -> None:
        try:
            with self._send_locks[peer]:
                self.links[peer].send(message)
        except (OSError, ValueError) as err:  # ValueError: the link was closed here
            raise PeerUnavailable(f"server process {peer + 1} cannot be reached: {err}") from err

    def _receive(self, peer: int, link: multiprocessing.connection.Connection, batcher) -> None:
        while True:
            try:
                message = link.recv()
            except (EOFError, OSError):
                break
            if message[0] == "query":
                self._run_for_peer(peer, batcher, *message[1:])
            else:
                self._answered(*message[1:])
        self._alive = self._alive - {peer}
        gone = PeerUnavailable(f"server process {peer + 1} stopped before answering")
        for token, (loop, future, to) in list(self._pending.items()):
            if to == peer:
                settle_soon(loop, future, gone)
        log.info("link to server process %d closed", peer + 1)

    def _run_for_peer(self, peer: int, batcher, token: int, query, deadline: float | None) -> None:
        def reply(outcome) -> None:
            try:
                try:
                    self._send(peer, ("answer", token, outcome))
                except PeerUnavailable:
                    raise
                except Exception as err:  # noqa: BLE001 - an answer that cannot be pickled still ends the asker's wait
                    self._send(peer, ("answer", token, RuntimeError(f"answer could not be sent back: {err}")))
            except PeerUnavailable:
                pass  # the asker is gone: nobody waits for this answer

        try:
            done = batcher.submit(query, deadline)
        except RuntimeError as err:  # this process is stopping: the asker computes the query itself
            reply(PeerUnavailable(f"server process {self.index + 1} is stopping: {err}"))
            return
        except Exception as err:  # noqa: BLE001 - refused on arrival (overloaded): the asker gets the reason
            reply(err)
            return
        done.add_done_callback(lambda f: reply(f.exception() or f.result()))

    def _answered(self, token: int, outcome) -> None:
        """``outcome``: the peer batcher's result for the query, or the ``Exception`` it raised (as :class:`server.batching.MicroBatcher` results go)."""
        entry = self._pending.get(token)
        if entry is not None:  # else the asker stopped waiting (cancelled)
            settle_soon(entry[0], entry[1], outcome)


def link_processes(n: int) -> list[Peers]:
    """Links between ``n`` server processes, made before they are forked: one :class:`Peers` per process.

    Each pair of processes shares a duplex Unix socket (:func:`multiprocessing.Pipe`). A
    child keeps its own ends and closes the rest (:func:`keep_own`); the parent closes
    them all once the children started, so that a process that dies closes its links
    and its peers stop waiting for it.

    Returns:
        ``peers[i]`` for process ``i``.
    """
    loads = multiprocessing.get_context("fork").RawArray("q", n)
    ends: list[dict[int, multiprocessing.connection.Connection]] = [{} for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            ends[i][j], ends[j][i] = multiprocessing.Pipe(duplex=True)
    return [Peers(i, ends[i], loads) for i in range(n)]


def keep_own(peers: list[Peers], index: int) -> Peers:
    """In process ``index`` after the fork: close the other processes' ends; returns this process's :class:`Peers`."""
    for i, p in enumerate(peers):
        if i != index:
            p._drop()
    return peers[index]


def close_all(peers: list[Peers]) -> None:
    """In the parent once every child started: close every end it holds (the children keep theirs)."""
    for p in peers:
        p._drop()
