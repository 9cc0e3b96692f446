"""A request's view of its user: the bundle's history, the events logged since and the request's own
recent events as one time-ordered sequence, and the items the request must not get.

Everything is encoded with the bundle's vocabularies; the engine hands the result to
the two stages as arrays. A batch of requests is assembled by one compiled pass
(:meth:`UserHistory.assemble`): after the CPU idled between requests every numpy call
costs tens of microseconds, so a dozen of them per request cost more than the work.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

from funnel.events.dataset import Dataset
from funnel.events.eventlog import UserEvent
from funnel.events.schema import BEHAVIOR_CODE
from funnel.events.sequences import Sequences, Window
from funnel.events.vocab import PAD
from funnel.recall.plugin import Excluded
from funnel.server.query import RecommendQuery
from funnel.server.state import StateUnavailable, UserState

log = logging.getLogger("funnel.history")


@dataclass
class Histories:
    """A batch of requests' users as the two stages take them.

    Attributes:
        window: [B, n] each user's latest events, right-aligned (:class:`events.sequences.Window`).
        now: [B] request times: the later of the bundle's last event and the user's newest.
        activity: [B] events in each user's whole merged history.
        exclude: the items each request must not get.
        users: [B] bundle user ids, :data:`PAD` for a user the bundle does not know.
    """

    window: Window
    now: np.ndarray
    activity: np.ndarray
    exclude: Excluded
    users: np.ndarray


class UserHistory:
    """Assembles users' sequences for requests against one bundle's data.

    Args:
        data: the bundle's vocabularies and per-user sequences.
        state: users' logged behaviour; ``None`` for none.
        data_end: the bundle's last event time (the earliest request time).
    """

    def __init__(self, data: Dataset, state: UserState | None, data_end: int = 0):
        self.data = data
        self.state = state
        self.data_end = int(data_end)

    def assemble(self, queries: Sequence[RecommendQuery], n: int) -> Histories:
        """Windows, request times, activity and exclusions of a batch of requests' users.

        Each user's history is :meth:`sequence`'s, cut to a window; a request excludes the
        items it names and, unless ``include_seen``, every item of that history. One
        compiled pass over the bundle's arrays and the events newer than it.

        Args:
            queries: validated queries.
            n: window length.

        Returns:
            Row ``b`` describes ``queries[b]``'s user.
        """
        data = self.data
        users = data.users.encode([q.user_id for q in queries])
        extra = [self._newer(q, int(u)) for q, u in zip(queries, users.tolist())]
        named = [data.items.encode(list(q.exclude_item_ids)) if q.exclude_item_ids else _NONE for q in queries]
        # Per user: newer events, named exclusions, whether seen items may come back. One
        # array, and the event arrays joined only when there are any: each numpy call
        # here costs more than the compiled pass with cold caches.
        counts = np.array([(len(e[0]), len(x), q.include_seen) for e, x, q in zip(extra, named, queries)], np.int64).reshape(len(queries), 3)
        seqs = data.seqs
        w_items, w_categories, w_behaviors, w_ts, lengths, activity, now, keys, most = _assemble(
            seqs.offsets,
            seqs.items,
            seqs.categories,
            seqs.behaviors,
            seqs.ts,
            data.item_category,
            users,
            counts,
            _joined([e[0] for e in extra], _NONE),
            _joined([e[1] for e in extra], _NO_BEHAVIORS),
            _joined([e[2] for e in extra], _NONE),
            _joined(named, _NONE),
            n,
            self.data_end,
            data.items.size,
        )
        window = Window(w_items, w_categories, w_behaviors, w_ts, lengths)
        return Histories(window, now, activity, Excluded.from_keys(keys, data.items.size, most), users)

    def sequence(self, query: RecommendQuery) -> Sequences:
        """The user's bundle history, logged events and the request's recent events, as one time-ordered sequence.

        Events on items this bundle does not know are left out (they stay in the state
        and count once a bundle includes the items).

        Returns:
            A one-user :class:`Sequences`.
        """
        data, seqs = self.data, self.data.seqs
        user = int(data.users.encode([query.user_id])[0])
        lo, hi = (seqs.offsets[user], seqs.offsets[user + 1]) if user != PAD else (0, 0)
        items, behaviors, ts = self._newer(query, user)
        if not len(items):
            # Nothing newer than the bundle: the user's part of it, already in time order, as views (nothing downstream writes to them).
            return Sequences(np.array([0, hi - lo], np.int64), seqs.items[lo:hi], seqs.categories[lo:hi], seqs.behaviors[lo:hi], seqs.ts[lo:hi])
        n = hi - lo + len(items)
        return Sequences.from_encoded(
            np.zeros(n, np.int64),
            np.concatenate([seqs.items[lo:hi], items]),
            np.concatenate([seqs.categories[lo:hi], data.item_category[items]]),
            np.concatenate([seqs.behaviors[lo:hi], behaviors]),
            np.concatenate([seqs.ts[lo:hi], ts]),
            1,
        )

    def _newer(self, query: RecommendQuery, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The user's events newer than the bundle (logged, then the request's own) on items the bundle knows.

        Args:
            query: the request.
            user: its user's bundle id (:data:`PAD` if unknown).

        Returns:
            (items int64, behaviours int8, times int64), in arrival order; empty arrays when there are none.
        """
        seqs = self.data.seqs
        lo, hi = (seqs.offsets[user], seqs.offsets[user + 1]) if user != PAD else (0, 0)
        recent = (*self._logged(query.user_id, lo, hi), *query.recent_events)
        if not recent:
            return _NONE, _NO_BEHAVIORS, _NONE
        items = self.data.items.encode([e.item_id for e in recent])
        known = items != PAD
        if not known.all():
            # Items newer than the bundle cannot be embedded yet; they count once a rebuild includes them.
            log.debug("request %s: %d logged or recent events on unknown items ignored", query.request_id, int((~known).sum()))
        behaviors = np.array([BEHAVIOR_CODE[e.behavior] for e in recent], dtype=np.int8)[known]
        ts = np.array([e.timestamp for e in recent], dtype=np.int64)[known]
        return items[known], behaviors, ts

    def _logged(self, user_id: str, lo: int, hi: int) -> tuple[UserEvent, ...]:
        """The user's logged events minus those the bundle already holds (folded in by training)."""
        if self.state is None:
            return ()
        try:
            logged = self.state.recent(user_id)
        except StateUnavailable as err:
            # Recommend sits in callers' request paths: answer from the bundle rather than fail.
            log.warning("user state unavailable, serving %r without live behaviour: %s", user_id, err)
            return ()
        seqs = self.data.seqs
        if not logged or hi == lo or logged[0].timestamp > seqs.ts[hi - 1]:
            return logged
        held = set(zip(self.data.items.decode(seqs.items[lo:hi]), seqs.behaviors[lo:hi].tolist(), seqs.ts[lo:hi].tolist()))
        return tuple(e for e in logged if (e.item_id, BEHAVIOR_CODE[e.behavior], e.timestamp) not in held)


_NONE = np.zeros(0, np.int64)
_NO_BEHAVIORS = np.zeros(0, np.int8)


def _joined(arrays: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    """The arrays end to end; ``empty`` itself when they hold nothing (no numpy call)."""
    return np.concatenate(arrays) if any(len(a) for a in arrays) else empty


@numba.njit(cache=True, nogil=True)
def _assemble(offsets, items, categories, behaviors, ts, item_category, users, counts, extra_items, extra_behaviors, extra_ts, named, n, data_end, width):
    """Each user's bundle history and newer events merged in time order, cut to windows, with their exclusions.

    Args:
        offsets, items, categories, behaviors, ts: the bundle's per-user sequences.
        item_category: [M] category id per item id.
        users: [B] bundle user ids (0: unknown, no bundle history).
        counts: [B, 3] per user: newer events, named exclusions, and 1 where the
            request lets seen items come back (else every item of the user's merged
            history is excluded).
        extra_items, extra_behaviors, extra_ts: the newer events, user by user, arrival
            order within a user; they follow the bundle's events at equal times.
        named: the item ids the requests name to exclude, user by user (0 is skipped).
        n: window length.
        data_end: the bundle's last event time.
        width: the catalogue size, the exclusion keys' stride.

    Returns:
        (window items, categories, behaviours, times: int64 [B, n]; window lengths [B];
        activity [B]; now [B]; sorted exclusion keys ``row * width + item``; the most keys
        of a row).
    """
    b = len(users)
    w_items = np.zeros((b, n), np.int64)
    w_categories = np.zeros((b, n), np.int64)
    w_behaviors = np.zeros((b, n), np.int64)
    w_ts = np.zeros((b, n), np.int64)
    lengths = np.zeros(b, np.int64)
    activity = np.zeros(b, np.int64)
    now = np.full(b, data_end, np.int64)
    spans = np.zeros((b, 2), np.int64)
    room = len(named)
    for i in range(b):
        if users[i] > 0:
            spans[i, 0], spans[i, 1] = offsets[users[i]], offsets[users[i] + 1]
        activity[i] = spans[i, 1] - spans[i, 0] + counts[i, 0]
        lengths[i] = min(n, activity[i])
        room += 0 if counts[i, 2] else activity[i]
    keys = np.empty(room, np.int64)
    size = most = e0 = x0 = 0
    for i in range(b):
        lo, hi = spans[i, 0], spans[i, 1]
        held, e1, x1 = hi - lo, e0 + counts[i, 0], x0 + counts[i, 1]
        # Merged position p: a bundle event below ``held``, a newer event from there on.
        merged_ts = np.empty(activity[i], np.int64)
        merged_ts[:held] = ts[lo:hi]
        merged_ts[held:] = extra_ts[e0:e1]
        order = np.argsort(merged_ts, kind="mergesort") if e1 > e0 else np.arange(activity[i])
        m = lengths[i]
        for slot in range(m):
            p = order[activity[i] - m + slot]
            col = n - m + slot
            if p < held:
                w_items[i, col], w_categories[i, col], w_behaviors[i, col], w_ts[i, col] = items[lo + p], categories[lo + p], behaviors[lo + p], ts[lo + p]
            else:
                e = e0 + p - held
                w_items[i, col], w_categories[i, col], w_behaviors[i, col], w_ts[i, col] = extra_items[e], item_category[extra_items[e]], extra_behaviors[e], extra_ts[e]
        if activity[i]:
            now[i] = max(data_end, merged_ts.max())
        seen = 0 if counts[i, 2] else activity[i]
        row = np.empty(x1 - x0 + seen, np.int64)
        row[: x1 - x0] = named[x0:x1]
        if seen:
            row[x1 - x0 : x1 - x0 + held] = items[lo:hi]
            row[x1 - x0 + held :] = extra_items[e0:e1]
        row.sort()
        first, previous = size, 0  # starting from padding skips it: ids are >= 0 and the row is sorted
        for item in row:
            if item != previous:
                keys[size] = i * width + item
                size += 1
            previous = item
        most = max(most, size - first)
        e0, x0 = e1, x1
    return w_items, w_categories, w_behaviors, w_ts, lengths, activity, now, keys[:size], most
