"""Micro-batching: gather concurrent requests into one call of a batch function.

Request threads :meth:`MicroBatcher.submit` an item and wait on the returned future
(coroutines :meth:`MicroBatcher.submit_async` one and await it); one worker thread
takes the first waiting item, keeps gathering until ``max_batch`` items or
``max_wait_s`` after that first one, drops the items whose deadline would
pass before the batch could finish (judged by recent batch times), and runs the
batch function once for the rest. Under overload this keeps the worker on requests
that can still be answered in time instead of on answers nobody waits for. While a batch
computes, new requests queue up, so under load batches grow by themselves and an
idle server adds at most ``max_wait_s`` to a lone request. The results of a batch
reach an event loop in one callback, so the worker wakes the loop (and hands it the
GIL) once per batch, not once per request.

Admission control: an item whose deadline the queued work would already overrun
(judged by the recent cost per item) is refused at once with :class:`Overloaded`, as is
any item beyond ``max_queue``, so overload sheds the excess without delay instead of
building a queue that every later request must wait through.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


STALL_FACTOR = 4.0
"""One batch moves the cost estimates up by at most this factor of their current value
(before averaging). A batch stalled by something else in the process (a bundle loading
for a swap holds the GIL for moments) then does not make every queued request look 20x
dearer and shed requests that would have been answered in time; a server that really
became slower still raises its estimates within a few batches."""


class DeadlineExpired(Exception):
    """The caller's deadline passed before its batch ran; the item was not computed."""


class Overloaded(Exception):
    """Refused on arrival: the work already queued would not finish before the caller's deadline
    (or the queue is full), so the item was not queued."""


@dataclass
class _Pending:
    """One queued item; ``loop`` is set when ``future`` is an ``asyncio.Future`` of that loop."""

    item: object
    deadline: float | None
    future: "Future | asyncio.Future"
    loop: asyncio.AbstractEventLoop | None = None
    enqueued: float = field(default_factory=time.monotonic)

    def claim(self) -> bool:
        """Whether the caller still waits: marks a thread future running; false once it (or the awaiting task) was cancelled."""
        if self.loop is None:
            return self.future.set_running_or_notify_cancel()
        return not self.future.done()  # only the loop settles it, so done here means cancelled


@dataclass
class BatchStats:
    """What one batch looked like, for metrics: its size, its items' queueing times (s), its run time (s)."""

    size: int
    waits_s: list[float]
    run_s: float
    expired: int


class MicroBatcher:
    """Runs ``run_batch`` over gathered items on one worker thread (see the module docstring).

    Args:
        run_batch: maps a list of items to a list of the same length; an entry that is
            an ``Exception`` is raised to that item's caller, anything else returned.
            If the call itself raises, every item of the batch gets that exception.
        max_batch: most items per call.
        max_wait_s: how long to keep gathering after the first item of a batch; 0
            takes only what is already waiting.
        on_batch: called with a :class:`BatchStats` after every batch (metrics).
        max_queue: most items waiting; more are refused with :class:`Overloaded`.
        initializer: called once on the worker thread before its first batch, for the
            settings a library keeps per thread (OpenMP's thread count: see
            :func:`server.app.thread_settings`).
        on_load: called with :attr:`load` whenever it changes (an item queued, a batch
            started or finished), from the thread that changed it; for
            :meth:`server.peers.Peers.publish`.
    """

    def __init__(
        self,
        run_batch: Callable[[list], Sequence],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        on_batch: Callable[[BatchStats], None] | None = None,
        max_queue: int = 1024,
        initializer: Callable[[], None] | None = None,
        on_load: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.max_queue = max_queue
        self._initializer = initializer
        self.on_load = on_load
        self._running = 0  # items of the batch computing now
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._closed = False
        self._run_s = 0.0  # moving average of batch run times: how long a new batch will likely take
        self._item_s = 0.0  # moving average of batch run time per item: what each queued item adds
        self._worker = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._worker.start()

    @property
    def load(self) -> int:
        """Items queued or computing now (read without a lock: a moment's estimate)."""
        return self._queue.qsize() + self._running

    def submit(self, item, deadline: float | None = None) -> Future:
        """Queue ``item``; the future resolves to its result or raises its error.

        Args:
            item: one input of ``run_batch``.
            deadline: ``time.monotonic()`` value after which the item is not worth
                computing (the future then raises :class:`DeadlineExpired`).

        Raises:
            RuntimeError: after :meth:`close`.
            Overloaded: the queued work would overrun ``deadline``, or ``max_queue`` items wait.
        """
        return self._enqueue(_Pending(item, deadline, Future()))

    def submit_async(self, item, deadline: float | None = None) -> asyncio.Future:
        """As :meth:`submit`, from a coroutine: returns a future of the running loop.

        Cancelling it (the awaiting task was cancelled) before its batch runs leaves the
        item uncomputed.

        Raises:
            RuntimeError: no running event loop, or after :meth:`close`.
            Overloaded: as :meth:`submit`.
        """
        loop = asyncio.get_running_loop()
        return self._enqueue(_Pending(item, deadline, loop.create_future(), loop))

    def _enqueue(self, pending: _Pending):
        """Admission control (see the module docstring), then queue ``pending``; returns its future."""
        if self._closed:
            raise RuntimeError("micro-batcher is closed")
        waiting = self._queue.qsize()
        if waiting >= self.max_queue:
            raise Overloaded(f"{waiting} requests already queued (the most is {self.max_queue})")
        if pending.deadline is not None and self._item_s > 0:
            # The batch now running, then every queued item and this one at the recent cost per item.
            expected = self._run_s + (waiting + 1) * self._item_s
            left = pending.deadline - time.monotonic()
            if expected > left:
                raise Overloaded(f"{waiting} requests queued ahead, about {expected * 1e3:.1f} ms of work, more than the {max(left, 0) * 1e3:.1f} ms left")
        self._queue.put(pending)
        self._publish_load()
        return pending.future

    def _publish_load(self) -> None:
        if self.on_load is not None:
            self.on_load(self.load)

    def close(self, timeout: float | None = 5.0) -> None:
        """Finish the queued items, then stop the worker."""
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout)

    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """The batch starting with ``first``; also whether the close marker was seen."""
        batch = [first]
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get_nowait() if self.max_wait_s == 0 else self._queue.get(timeout=max(until - time.monotonic(), 0))
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _loop(self) -> None:
        if self._initializer is not None:
            try:
                self._initializer()
            except Exception:  # noqa: BLE001 - the worker still serves, with the library defaults
                log.exception("micro-batcher initializer failed")
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._gather(first)
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        live, late, expired = [], [], 0
        finish_by = started + self._run_s
        for p in batch:
            if not p.claim():
                expired += 1  # its caller gave up waiting (deadline passed or cancelled)
            elif p.deadline is not None and p.deadline <= finish_by:
                expired += 1
                late.append((p, DeadlineExpired(f"deadline {p.deadline - started:+.3f}s away when its batch (about {self._run_s:.3f}s) would start")))
            else:
                live.append(p)
        _settle(late)
        self._running = len(live)
        self._publish_load()
        if live:
            try:
                results = self.run_batch([p.item for p in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
            except Exception as err:  # noqa: BLE001 - handed to every caller of the batch
                log.exception("batch of %d failed", len(live))
                results = [err] * len(live)
            self._running = 0
            self._publish_load()
            _settle(list(zip(live, results)))
        run_s = time.monotonic() - started
        if live:
            self._run_s = run_s if self._run_s == 0 else 0.8 * self._run_s + 0.2 * min(run_s, STALL_FACTOR * self._run_s)
            item_s = run_s / len(live)
            self._item_s = item_s if self._item_s == 0 else 0.8 * self._item_s + 0.2 * min(item_s, STALL_FACTOR * self._item_s)
        if self.on_batch is not None:
            stats = BatchStats(len(live), [started - p.enqueued for p in live], run_s, expired)
            try:
                self.on_batch(stats)
            except Exception:  # noqa: BLE001 - metrics must never stop serving
                log.exception("on_batch callback failed")


def _settle(outcomes: list[tuple[_Pending, object]]) -> None:
    """Give each item its outcome (an ``Exception`` is raised to its caller): thread futures
    here, each event loop's futures in one callback on that loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, object]]] = {}
    for p, outcome in outcomes:
        if p.loop is None:
            _set(p.future, outcome)
        else:
            by_loop.setdefault(p.loop, []).append((p.future, outcome))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, items)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits these futures any more


def settle_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future, outcome: object) -> None:
    """From another thread, give ``loop``'s ``future`` its outcome (an ``Exception`` is raised to its awaiter); nothing if the loop is closed."""
    try:
        loop.call_soon_threadsafe(_set, future, outcome)
    except RuntimeError:
        pass  # the loop is closed: nobody awaits the future any more


def _set_all(items: list[tuple[asyncio.Future, object]]) -> None:
    for future, outcome in items:
        _set(future, outcome)


def _set(future: "Future | asyncio.Future", outcome: object) -> None:
    if future.done():
        return  # an awaiting task was cancelled after its batch started
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
