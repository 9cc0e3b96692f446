"""Per-user, time-ordered behaviour sequences as flat arrays plus offsets.

User ``u``'s events are ``items[offsets[u]:offsets[u + 1]]`` (and the same slice of
``categories``, ``behaviors``, ``ts``), oldest first. No Python object per user, so
millions of users cost a few flat arrays.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from funnel.events.vocab import PAD


@dataclass
class Sequences:
    """Flat per-user sequences.

    Attributes:
        offsets: int64 [U + 1]; user ``u`` owns positions ``offsets[u]:offsets[u + 1]``.
        items, categories: int64 [N] vocabulary ids.
        behaviors: int8 [N] behaviour codes.
        ts: int64 [N] unix seconds, non-decreasing within a user.
    """

    offsets: np.ndarray
    items: np.ndarray
    categories: np.ndarray
    behaviors: np.ndarray
    ts: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def from_encoded(cls, users: np.ndarray, items: np.ndarray, categories: np.ndarray, behaviors: np.ndarray, ts: np.ndarray, num_users: int) -> "Sequences":
        """Group encoded events by user, ordered by time (ties keep input order).

        Args:
            users: int user ids in ``[0, num_users)``.
            items, categories, behaviors, ts: per-event arrays of the same length.
            num_users: size of the user id space (the user vocabulary's ``size``).
        """
        order = _user_time_order(np.asarray(users, np.int64), np.asarray(ts, np.int64), num_users)
        return cls._laid_out(users, items, categories, behaviors, ts, num_users, order)

    @classmethod
    def _laid_out(cls, users, items, categories, behaviors, ts, num_users: int, order: np.ndarray) -> "Sequences":
        """:meth:`from_encoded` with the (user, time) order already computed."""
        counts = np.bincount(users, minlength=num_users)
        offsets = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(
            offsets=offsets,
            items=np.asarray(items, dtype=np.int64)[order],
            categories=np.asarray(categories, dtype=np.int64)[order],
            behaviors=np.asarray(behaviors, dtype=np.int8)[order],
            ts=np.asarray(ts, dtype=np.int64)[order],
        )

    def user_positions(self) -> np.ndarray:
        """int64 [N]: the user owning each position."""
        return np.repeat(np.arange(self.num_users), self.lengths)

    def window(self, ends: np.ndarray, n: int, starts: np.ndarray | None = None) -> "Window":
        """The last ``n`` events before each end position, right-aligned and padded.

        Args:
            ends: int64 [B] exclusive end positions into the flat arrays.
            n: window length.
            starts: int64 [B] first positions the window may reach back to, normally
                ``offsets[user]`` so a window never crosses into another user.

        Returns:
            A :class:`Window` whose arrays are [B, n], most recent event last, padded on
            the left with :data:`PAD` (items/categories/behaviours) and 0 (ts).
        """
        ends = np.asarray(ends, dtype=np.int64)
        starts = np.zeros_like(ends) if starts is None else np.asarray(starts, dtype=np.int64)
        idx = ends[:, None] - n + np.arange(n)[None, :]  # [B, n]
        valid = idx >= starts[:, None]
        idx = np.where(valid, idx, 0)
        take = lambda a, fill: np.where(valid, a[idx] if len(a) else fill, fill)
        return Window(
            items=take(self.items, PAD),
            categories=take(self.categories, PAD),
            behaviors=take(self.behaviors, PAD).astype(np.int64),
            ts=take(self.ts, 0),
            lengths=np.minimum(ends - starts, n),
        )

    def user_window(self, users: np.ndarray, n: int, ends: np.ndarray | None = None) -> "Window":
        """The last ``n`` events of each user, or of each user's prefix up to ``ends``."""
        users = np.asarray(users, dtype=np.int64)
        starts = self.offsets[users]
        return self.window(self.offsets[users + 1] if ends is None else ends, n, starts)

    def history_matrix(self, users: np.ndarray, ends: np.ndarray, num_items: int, starts: np.ndarray | None = None) -> sp.csr_matrix:
        """Binary [len(users), num_items] matrix of the items each user touched before ``ends``.

        Used to mask already-seen items in full-ranking evaluation and serving.

        Args:
            users, ends: [B] users and the position each history stops before.
            num_items: M.
            starts: [B] positions the histories start at (default: each user's first event).
        """
        users = np.asarray(users, dtype=np.int64)
        starts = self.offsets[users] if starts is None else np.asarray(starts, dtype=np.int64)
        counts = np.maximum(np.asarray(ends) - starts, 0)
        rows = np.repeat(np.arange(len(users)), counts)
        pos = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        m = sp.csr_matrix((np.ones(len(pos), dtype=np.float32), (rows, self.items[pos])), shape=(len(users), num_items))
        m.data[:] = 1.0
        return m

    def append(self, other: "Sequences") -> tuple["Sequences", np.ndarray]:
        """Merge two sequence sets over the same user id space (``other`` may be longer).

        Returns:
            The merged sequences, and bool [N] marking the positions that came from
            ``other`` (time ties put ``self``'s events first).
        """
        users = np.concatenate([self.user_positions(), other.user_positions()])
        ts = np.concatenate([self.ts, other.ts])
        num_users = max(self.num_users, other.num_users)
        order = _user_time_order(users, ts, num_users)
        merged = Sequences._laid_out(
            users,
            np.concatenate([self.items, other.items]),
            np.concatenate([self.categories, other.categories]),
            np.concatenate([self.behaviors, other.behaviors]),
            ts,
            num_users,
            order,
        )
        return merged, order >= len(self)

    def to_frame(self) -> pd.DataFrame:
        """Long format: ``user, item, category, behavior, ts``."""
        return pd.DataFrame(
            {"user": self.user_positions(), "item": self.items, "category": self.categories, "behavior": self.behaviors, "ts": self.ts}
        )

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, num_users: int) -> "Sequences":
        return cls.from_encoded(
            frame["user"].to_numpy(), frame["item"].to_numpy(), frame["category"].to_numpy(), frame["behavior"].to_numpy(), frame["ts"].to_numpy(), num_users
        )


@dataclass
class Window:
    """A batch of right-aligned sequence windows; every array is [B, n] except ``lengths`` [B]."""

    items: np.ndarray
    categories: np.ndarray
    behaviors: np.ndarray
    ts: np.ndarray
    lengths: np.ndarray

    def tail(self, n: int) -> "Window":
        """The last ``n`` columns (a shorter window over the same events)."""
        return Window(self.items[:, -n:], self.categories[:, -n:], self.behaviors[:, -n:], self.ts[:, -n:], np.minimum(self.lengths, n))


def _user_time_order(users: np.ndarray, ts: np.ndarray, num_users: int) -> np.ndarray:
    """Stable order of events by (user, time): ties keep input order.

    One stable argsort of a combined ``user * span + time`` key where it fits in int64
    (always, for a log of seconds within decades), else a lexsort: at 100M events one
    sort of one key is several times faster than sorting by two.
    """
    if not len(ts):
        return np.zeros(0, np.int64)
    lo, span = int(ts.min()), int(ts.max()) - int(ts.min()) + 1
    if num_users * span < 2**62:
        return np.argsort(users * span + (ts - lo), kind="stable")
    return np.lexsort((ts, users))
