"""The durable, append-only event store behind ``LogEvents``: SQLite in WAL mode, ``synchronous=FULL``.

Every ``LogEvents`` batch is one transaction, committed (and so fsynced to the WAL)
before the call returns: an acknowledged event survives ``kill -9`` and power loss.
The server replays the store into its user state on start; ``funnel train
--fold-events`` reads it back as an :class:`events.readers.EventLog`.

Events are stored raw (string ids, behaviour names), never as bundle ids, so they
stay meaningful across bundle versions and keep items no bundle knows yet.
"""

import fcntl
import mmap
import os
import sqlite3
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from funnel.events.readers import EventLog, ReadReport
from funnel.events.schema import BEHAVIOR_CODE
from funnel.events.vocab import is_integer_ids

FORMAT_VERSION = 1
UNKNOWN_CATEGORY = "unknown"
"""Category of folded events on items neither the event nor the base log places."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    category_id TEXT NOT NULL,
    behavior TEXT NOT NULL,
    ts INTEGER NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class UserEvent:
    """One logged behaviour, with raw ids as the caller spelled them.

    Attributes:
        user_id: who did it.
        item_id: the item; may be unknown to the served bundle.
        category_id: the item's category; ``""`` when the caller did not say and the
            bundle did not know the item.
        behavior: one of :data:`events.schema.BEHAVIORS`.
        timestamp: unix seconds.
    """

    user_id: str
    item_id: str
    category_id: str
    behavior: str
    timestamp: int


class EventStoreError(ValueError):
    """The event store file is unreadable or of an unknown format."""


@dataclass
class _Pending:
    """One caller's batch waiting for a group commit, and what became of it."""

    rows: list[tuple]
    done: bool = False
    error: BaseException | None = None


class EventStore:
    """Append-only event log in one SQLite file; safe to share between threads.

    Concurrent appends are group-committed: whichever caller gets the write lock
    commits every batch queued by then in one transaction (one fsync), each batch in
    its own savepoint, so a batch still succeeds or fails whole and throughput grows
    with concurrency instead of being one fsync per call.

    Args:
        path: the database file (created with its directory when missing).
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            # Autocommit mode: transactions are opened explicitly, one per append.
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsynced at every commit, so a committed batch survives power loss.
            self._conn.execute("PRAGMA synchronous=FULL")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, FORMAT_VERSION):
                raise EventStoreError(f"{path}: event store format {version}, this Funnel reads {FORMAT_VERSION}")
            self._conn.execute(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        except sqlite3.DatabaseError as err:
            raise EventStoreError(f"{path}: not a usable event store ({err})") from err
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        # Reads on their own connection: in WAL mode they neither wait for nor block a commit's fsync.
        self._reader = sqlite3.connect(path, check_same_thread=False)
        self._read_lock = threading.Lock()
        try:
            self._mark = CommitMark(path + "-mark")
        except OSError as err:
            raise EventStoreError(f"{path}-mark: cannot open the store's commit mark ({err})") from err
        # Raised to what is stored already: the store may predate its mark, or have lost it.
        self._mark.raise_to(self._reader.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])

    def append(self, events: Sequence[UserEvent]) -> None:
        """Store a batch atomically; returns once it is committed to disk.

        Args:
            events: the batch; all of it is stored or, on error, none of it.
        """
        mine = _Pending([(e.user_id, e.item_id, e.category_id, e.behavior, int(e.timestamp)) for e in events])
        with self._queue_lock:
            self._queue.append(mine)
        with self._lock:
            if not mine.done:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit(group)
        if mine.error is not None:
            raise mine.error

    def _commit(self, group: list[_Pending]) -> None:
        """One transaction for several callers' batches; marks each done or failed, then raises the commit mark."""
        last = None
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            for pending in group:
                self._conn.execute("SAVEPOINT batch")
                try:
                    self._conn.executemany("INSERT INTO events (user_id, item_id, category_id, behavior, ts) VALUES (?, ?, ?, ?, ?)", pending.rows)
                    self._conn.execute("RELEASE batch")
                except sqlite3.Error as err:
                    self._conn.execute("ROLLBACK TO batch")
                    self._conn.execute("RELEASE batch")
                    pending.error = err
            last = self._conn.execute("SELECT max(seq) FROM events").fetchone()[0]
            self._conn.execute("COMMIT")
        except BaseException as err:
            last = None
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            for pending in group:
                pending.error = pending.error or err
        finally:
            if last is not None:
                self._mark.raise_to(last)
            for pending in group:
                pending.done = True

    def committed_after(self, seq: int) -> bool:
        """Whether any process may have committed events after sequence number ``seq``: no SQLite call, one shared memory read.

        False means :meth:`since` would return nothing. True usually means it returns
        something; it returns nothing only when the mark was left higher than this store's
        events (the store file was replaced, its mark was not).
        """
        try:
            return self._mark.read() > seq
        except ValueError:  # the mark's map is closed: report it as SQLite reports a closed store
            raise sqlite3.ProgrammingError(f"{self.path}: the event store is closed") from None

    def count(self) -> int:
        """Number of stored events."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def batches(self, size: int = 10_000) -> Iterator[list[UserEvent]]:
        """All stored events in append order, ``size`` at a time (for replay)."""
        last = 0
        while True:
            last, events = self.since(last, size)
            if not events:
                return
            yield events

    def since(self, seq: int, size: int = 10_000) -> tuple[int, list[UserEvent]]:
        """Events committed after sequence number ``seq`` (by any process), at most ``size``, in append order.

        Returns:
            The last sequence number read (``seq`` when there was nothing new) and the events.
        """
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT seq, user_id, item_id, category_id, behavior, ts FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, size)
            ).fetchall()
        return (rows[-1][0] if rows else seq), [UserEvent(*row[1:]) for row in rows]

    def close(self) -> None:
        """Close the file; later calls fail."""
        with self._lock, self._read_lock:
            self._conn.close()
            self._reader.close()
            self._mark.close()


class CommitMark:
    """The highest sequence number committed to an event store, in an 8-byte file every process maps.

    A writer raises it after each commit, under a file lock (which orders the processes
    and the stores of one process; a store's own commits are ordered by its lock), so it
    only goes up. Readers compare it with the last sequence number they read instead of
    querying SQLite: before each ``Recommend`` that query cost 0.12-0.14 ms with cold
    caches, the mark's read costs a memory load. Like SQLite's own WAL index, it needs the processes on one
    machine (a local file system).

    Args:
        path: the mark's file, created (as 0) when missing.
    """

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with _locked(self._fd):
                if os.fstat(self._fd).st_size < _MARK.size:
                    os.ftruncate(self._fd, _MARK.size)
            self._map = mmap.mmap(self._fd, _MARK.size)
        except OSError:
            os.close(self._fd)
            raise

    def read(self) -> int:
        """The mark: at least the highest committed sequence number."""
        return _MARK.unpack_from(self._map)[0]

    def raise_to(self, seq: int) -> None:
        """Set the mark to ``seq`` unless it is already higher."""
        with _locked(self._fd):
            if seq > self.read():
                _MARK.pack_into(self._map, 0, seq)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


_MARK = struct.Struct("<q")


class _locked:
    """An exclusive ``flock`` on a file descriptor for the ``with`` block: it excludes other open descriptions of the file, not other threads on this one."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def read_event_store(path: str, after: int = 0) -> EventLog:
    """Read an event store as a behaviour log (the columns every reader returns).

    Args:
        path: an event store written by :class:`EventStore`; a live server may be
            appending to it (WAL readers see the last committed state).
        after: only events with a sequence number above this (0: all).

    Returns:
        The events in append order; empty categories stay ``""`` (see :func:`fold_events`).

    Raises:
        FileNotFoundError: no such file.
        EventStoreError: the file is not an event store.
    """
    return read_event_store_since(path, after)[0]


def read_event_store_since(path: str, after: int = 0, upto: int | None = None) -> tuple[EventLog, int]:
    """:func:`read_event_store` of the events after sequence number ``after`` (and at most ``upto``), and the last sequence number read.

    Returns:
        The log and the highest sequence number in it (``after`` when there was nothing new),
        read in one query, so events committed meanwhile are left for the next read.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such event store")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            frame = pd.read_sql_query(
                "SELECT seq, user_id, item_id, category_id, behavior, ts FROM events WHERE seq > ? AND seq <= ? ORDER BY seq",
                conn,
                params=(int(after), int(upto) if upto is not None else 2**63 - 1),
            )
        finally:
            conn.close()
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as err:
        raise EventStoreError(f"{path}: not a readable event store ({err})") from err
    string = lambda col: pd.array(frame[col].astype(str), dtype="string[pyarrow]")
    events = pd.DataFrame(
        {
            "user": string("user_id"),
            "item": string("item_id"),
            "category": string("category_id"),
            "behavior": frame["behavior"].map(BEHAVIOR_CODE).to_numpy(dtype=np.int8),
            "ts": frame["ts"].to_numpy(dtype=np.int64),
        }
    )
    items = events.drop_duplicates("item", keep="last")[["item", "category"]].reset_index(drop=True)
    items["title"] = pd.array([""] * len(items), dtype="string[pyarrow]")
    items["tags"] = pd.array([""] * len(items), dtype="string[pyarrow]")
    last = int(frame["seq"].iloc[-1]) if len(frame) else int(after)
    return EventLog(events, items, path, ReadReport(rows=len(events))), last


def _string_ids(log: EventLog) -> EventLog:
    """``log`` with its integer id columns as strings (``7`` -> ``"7"``)."""
    ids = {"user": "string[pyarrow]", "item": "string[pyarrow]", "category": "string[pyarrow]"}
    items = log.items.astype({"item": "string[pyarrow]", "category": "string[pyarrow]"})
    return EventLog(log.events.astype(ids), items, log.source, log.report)


def fold_events(base: EventLog, extra: EventLog) -> EventLog:
    """Append logged events to a behaviour log, for training on both.

    Items already in ``base`` keep its metadata (title, tags, category); an event
    with no category takes its item's category from ``base``, else ``"unknown"``.

    Args:
        base: the training log.
        extra: events from :func:`read_event_store`.

    Returns:
        One log: ``base``'s events then ``extra``'s, items of both.
    """
    if is_integer_ids(base.events["user"]):
        base = _string_ids(base)  # logged events carry string ids, which need not be numbers
    known = base.items.set_index("item")["category"]
    added = extra.events.copy()
    blank = added["category"] == ""
    if blank.any():
        filled = added.loc[blank, "item"].map(known).fillna(UNKNOWN_CATEGORY)
        added.loc[blank, "category"] = filled.astype("string[pyarrow]")
    events = pd.concat([base.events, added], ignore_index=True)
    new_items = added.drop_duplicates("item", keep="last")
    new_items = new_items[~new_items["item"].isin(base.items["item"])][["item", "category"]]
    new_items = new_items.assign(
        title=pd.array([""] * len(new_items), dtype="string[pyarrow]"), tags=pd.array([""] * len(new_items), dtype="string[pyarrow]")
    )
    items = pd.concat([base.items, new_items], ignore_index=True)
    report = ReadReport(rows=base.report.rows + len(added), skipped=base.report.skipped.copy(), examples=list(base.report.examples))
    return EventLog(events, items, base.source, report)
