"""A request's view of its user: the bundle's history, the events logged since and the request's own
recent events as one time-ordered sequence, and the items the request must not get.

Everything is encoded with the bundle's vocabularies; the engine hands the result to
the two stages as arrays.
"""

import logging

import numpy as np

from funnel.events.dataset import Dataset
from funnel.events.eventlog import UserEvent
from funnel.events.schema import BEHAVIOR_CODE
from funnel.events.sequences import Sequences
from funnel.events.vocab import PAD
from funnel.server.query import RecommendQuery
from funnel.server.state import StateUnavailable, UserState

log = logging.getLogger("funnel.history")


class UserHistory:
    """Assembles users' sequences for requests against one bundle's data.

    Args:
        data: the bundle's vocabularies and per-user sequences.
        state: users' logged behaviour; ``None`` for none.
    """

    def __init__(self, data: Dataset, state: UserState | None):
        self.data = data
        self.state = state

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
        recent = (*self._logged(query.user_id, lo, hi), *query.recent_events)
        if not recent:
            # Nothing newer than the bundle: the user's part of it, already in time order, as views (nothing downstream writes to them).
            return Sequences(np.array([0, hi - lo], np.int64), seqs.items[lo:hi], seqs.categories[lo:hi], seqs.behaviors[lo:hi], seqs.ts[lo:hi])
        items = data.items.encode([e.item_id for e in recent])
        known = items != PAD
        if not known.all():
            # Items newer than the bundle cannot be embedded yet; they count once a rebuild includes them.
            log.debug("request %s: %d logged or recent events on unknown items ignored", query.request_id, int((~known).sum()))
        behaviors = np.array([BEHAVIOR_CODE[e.behavior] for e in recent], dtype=np.int8)[known]
        ts = np.array([e.timestamp for e in recent], dtype=np.int64)[known]
        items = items[known]
        n = hi - lo + len(items)
        return Sequences.from_encoded(
            np.zeros(n, np.int64),
            np.concatenate([seqs.items[lo:hi], items]),
            np.concatenate([seqs.categories[lo:hi], data.item_category[items]]),
            np.concatenate([seqs.behaviors[lo:hi], behaviors]),
            np.concatenate([seqs.ts[lo:hi], ts]),
            1,
        )

    def excluded(self, query: RecommendQuery, seqs: Sequences) -> np.ndarray:
        """The distinct item ids ``query`` must not get: what it names, and the user's history ``seqs`` unless ``include_seen``."""
        excluded = self.data.items.encode(list(query.exclude_item_ids)) if query.exclude_item_ids else np.zeros(0, np.int64)
        if not query.include_seen:
            excluded = np.concatenate([excluded, seqs.items])
        return np.unique(excluded[excluded != PAD])

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


def stack(user_seqs: list[Sequences]) -> Sequences:
    """One-user sequences side by side as a batch of users (user ``b`` is ``user_seqs[b]``)."""
    lengths = np.array([len(s) for s in user_seqs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cat = lambda name: np.concatenate([getattr(s, name) for s in user_seqs])
    return Sequences(offsets, cat("items"), cat("categories"), cat("behaviors"), cat("ts"))
