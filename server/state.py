"""Users' live behaviour: what ``LogEvents`` appended, read back by every ``Recommend``.

The state lives outside the engine, so it survives bundle swaps: a new engine is
handed the same state object. Events are kept raw (string ids), so a new bundle
encodes them with its own vocabulary and items it did not know before count at once.

Implementations behind :class:`UserState`:

* :class:`MemoryState`: one process, nothing durable.
* :class:`SharedLogState`: memory fed by the SQLite event store, replayed on start
  and read for new events before each lookup, so the server processes on one machine
  that share the file see each other's events.
* :class:`RedisState`: a list per user in Redis, shared by several replicas; an
  event counts as stored once Redis acknowledged it (run Redis with
  ``appendonly yes`` and ``appendfsync always`` for on-disk durability).

Both keep the most recent ``max_events_per_user`` events per user; the event store
keeps everything.
"""

import json
import logging
import sqlite3
import sys
import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence

from funnel.events.eventlog import EventStore, UserEvent

log = logging.getLogger(__name__)

MAX_EVENTS_PER_USER = 200
"""Hot-state bound per user: well above the models' history windows, small enough for millions of users."""
REDIS_PREFIX = "funnel:"
REDIS_TIMEOUT_S = 1.0


class StateUnavailable(RuntimeError):
    """The state store cannot be reached (e.g. Redis is down) or the server keeps no state."""


class UserState(ABC):
    """Per-user event sequences, appended to by ``LogEvents`` and read by ``Recommend``.

    Implementations are safe to call from many threads at once.
    """

    @abstractmethod
    def append(self, events: Sequence[UserEvent]) -> None:
        """Store a batch; returns once it is as durable as this state promises.

        Raises:
            StateUnavailable: the backing store cannot be reached; nothing is acknowledged.
        """

    @abstractmethod
    def recent(self, user_id: str) -> tuple[UserEvent, ...]:
        """The user's most recent events, oldest first (empty for an unknown user).

        Raises:
            StateUnavailable: the backing store cannot be reached.
        """

    def close(self) -> None:
        """Release files and connections."""


def _merge(old: Sequence[UserEvent], new: Sequence[UserEvent], keep: int) -> tuple[UserEvent, ...]:
    """Time-ordered union of two batches (ties: ``old`` first, then arrival order), last ``keep`` only."""
    if not old or (new and new[0].timestamp >= old[-1].timestamp and all(a.timestamp <= b.timestamp for a, b in zip(new, new[1:]))):
        merged = (*old, *new)
    else:
        merged = tuple(sorted((*old, *new), key=lambda e: e.timestamp))
    return merged[-keep:]


class MemoryState(UserState):
    """User state in this process's memory.

    Args:
        max_events_per_user: older events beyond this many per user are dropped.
    """

    def __init__(self, max_events_per_user: int = MAX_EVENTS_PER_USER):
        if max_events_per_user < 1:
            raise ValueError(f"max_events_per_user must be >= 1, got {max_events_per_user}")
        self.max_events_per_user = max_events_per_user
        # Values are immutable tuples replaced whole under the lock, so readers need no lock.
        self._users: dict[str, tuple[UserEvent, ...]] = {}
        self._lock = threading.Lock()

    def append(self, events: Sequence[UserEvent]) -> None:
        # Each wire event brings its own string objects; interning makes every mention
        # of an item, category or user share one, roughly a third of the memory per event.
        intern = sys.intern
        by_user = _group([UserEvent(intern(e.user_id), intern(e.item_id), intern(e.category_id), intern(e.behavior), e.timestamp) for e in events])
        with self._lock:
            for user, batch in by_user.items():
                self._users[user] = _merge(self._users.get(user, ()), batch, self.max_events_per_user)

    def recent(self, user_id: str) -> tuple[UserEvent, ...]:
        return self._users.get(user_id, ())

    def stats(self) -> dict[str, int]:
        """Users and events held."""
        with self._lock:
            users = list(self._users.values())
        return {"users": len(users), "events": sum(map(len, users))}


class RedisState(UserState):
    """User state in Redis: key ``<prefix>u:<user_id>`` holds a list of compact JSON events.

    Appends are one MULTI/EXEC transaction (``RPUSH`` + ``LTRIM`` per user), so a batch
    is stored whole or not at all. The list is in arrival order; reads sort by time.

    Args:
        url: ``redis://HOST:PORT[/DB]``.
        max_events_per_user: the list is trimmed to this many most recently arrived events.
        prefix: key prefix, so several deployments can share one Redis.
    """

    def __init__(self, url: str, max_events_per_user: int = MAX_EVENTS_PER_USER, prefix: str = REDIS_PREFIX):
        import redis

        if max_events_per_user < 1:
            raise ValueError(f"max_events_per_user must be >= 1, got {max_events_per_user}")
        self.url = url
        self.max_events_per_user = max_events_per_user
        self.prefix = prefix
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        try:
            self._client.ping()
        except self._errors as err:
            raise StateUnavailable(f"cannot reach Redis at {url}: {err}") from err

    def _key(self, user_id: str) -> str:
        return f"{self.prefix}u:{user_id}"

    def append(self, events: Sequence[UserEvent]) -> None:
        pipe = self._client.pipeline(transaction=True)
        for user, batch in _group(events).items():
            key = self._key(user)
            pipe.rpush(key, *(json.dumps([e.item_id, e.category_id, e.behavior, e.timestamp], separators=(",", ":")) for e in batch))
            pipe.ltrim(key, -self.max_events_per_user, -1)
        pipe.incrby(f"{self.prefix}events", len(events))
        try:
            pipe.execute()
        except self._errors as err:
            raise StateUnavailable(f"Redis at {self.url}: {err}") from err

    def recent(self, user_id: str) -> tuple[UserEvent, ...]:
        try:
            raw = self._client.lrange(self._key(user_id), 0, -1)
        except self._errors as err:
            raise StateUnavailable(f"Redis at {self.url}: {err}") from err
        events = [UserEvent(user_id, item, category, behavior, ts) for item, category, behavior, ts in map(json.loads, raw)]
        return tuple(sorted(events, key=lambda e: e.timestamp))

    def total_appended(self) -> int:
        """Events ever appended through any replica (the trimmed-away ones included)."""
        return int(self._client.get(f"{self.prefix}events") or 0)

    def close(self) -> None:
        self._client.close()


class LoggedState(UserState):
    """A state whose appends go to the durable event store first.

    ``append`` returns after the store committed the batch and the inner state took
    it; ``recent`` reads the inner state.

    Args:
        inner: the hot state.
        store: the durable log.
    """

    def __init__(self, inner: UserState, store: EventStore):
        self.inner = inner
        self.store = store

    def append(self, events: Sequence[UserEvent]) -> None:
        self.store.append(events)
        self.inner.append(events)

    def recent(self, user_id: str) -> tuple[UserEvent, ...]:
        return self.inner.recent(user_id)

    def close(self) -> None:
        self.inner.close()
        self.store.close()


class SharedLogState(UserState):
    """Memory state fed only by the durable event store, which several server processes may share.

    ``append`` commits to the store; ``recent`` first takes in whatever any process
    committed since its last read (one indexed SQLite read, on a connection of its own
    in WAL mode), so an event logged through one process is seen by the next
    ``Recommend`` on any process that shares the file.

    Args:
        store: the event store; replayed into memory when the state is built.
        max_events_per_user: hot-state bound per user.
    """

    def __init__(self, store: EventStore, max_events_per_user: int = MAX_EVENTS_PER_USER):
        self.inner = MemoryState(max_events_per_user)
        self.store = store
        self._seen = 0
        self._lock = threading.Lock()
        self.catch_up()

    def append(self, events: Sequence[UserEvent]) -> None:
        self.store.append(events)
        self.catch_up()

    def recent(self, user_id: str) -> tuple[UserEvent, ...]:
        try:
            self.catch_up()
        except sqlite3.Error as err:
            raise StateUnavailable(f"event store {self.store.path} cannot be read: {err}") from err
        return self.inner.recent(user_id)

    def catch_up(self) -> int:
        """Take in the events committed since the last call; returns how many."""
        taken = 0
        with self._lock:
            while self.store.committed_after(self._seen):
                last, events = self.store.since(self._seen)
                if not events:
                    return taken
                self.inner.append(events)
                self._seen, taken = last, taken + len(events)
        return taken

    def close(self) -> None:
        self.store.close()


def _group(events: Sequence[UserEvent]) -> dict[str, list[UserEvent]]:
    by_user: dict[str, list[UserEvent]] = defaultdict(list)
    for e in events:
        by_user[e.user_id].append(e)
    return by_user


def open_state(spec: str = "memory", *, event_log: str | None = None, max_events_per_user: int = MAX_EVENTS_PER_USER) -> UserState:
    """Build the server's user state.

    Args:
        spec: ``"memory"`` or ``"redis://HOST:PORT[/DB]"``.
        event_log: path of the durable event store, or ``None`` for none. With
            ``memory`` the store is replayed into the new state and read again for
            new events before each lookup (:class:`SharedLogState`: server processes
            sharing the file see each other's events); with Redis (which already
            holds the shared state) it is only appended to, as an archive for
            ``funnel train --fold-events``.
        max_events_per_user: hot-state bound per user.

    Returns:
        The state, replayed and ready.

    Raises:
        ValueError: an unknown ``spec``.
        StateUnavailable: Redis cannot be reached.
        events.eventlog.EventStoreError: the event log is unusable.
    """
    if spec == "memory":
        if event_log is None:
            return MemoryState(max_events_per_user)
        shared = SharedLogState(EventStore(event_log), max_events_per_user)
        stats = shared.inner.stats()
        log.info("replayed %d events from %s: %d users, %d events held", shared.store.count(), event_log, stats["users"], stats["events"])
        return shared
    if not spec.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"unknown state {spec!r}; expected 'memory' or 'redis://HOST:PORT'")
    inner = RedisState(spec, max_events_per_user)
    return inner if event_log is None else LoggedState(inner, EventStore(event_log))
