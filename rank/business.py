"""Business features: funnel statistics of items and categories from the training log.

Computed once per bundle, vectorised, from the training part of the log only (the
validation and test targets never count) and stored in the bundle, so training,
evaluation and serving read the same numbers. Per-user features are not tabulated
here: they come from the user's own recent behaviour at request time (see
:func:`user_business_features`), which is the same at training positions, in
evaluation and online, and never sees the future.
"""

import zipfile
from dataclasses import dataclass, field

import numpy as np

from funnel.events.schema import BEHAVIOR_CODE
from funnel.events.sequences import Sequences, Window
from funnel.rank.kernels import user_window_columns
from funnel.recall.lookup import kernel_array

PV, CART, FAV, BUY = (BEHAVIOR_CODE[b] for b in ("pv", "cart", "fav", "buy"))

ITEM_FEATURES = ("item_conversion", "item_cart_fav_rate", "item_wishlist", "item_repurchase", "item_users", "category_conversion", "category_cart_fav_rate", "category_repurchase")
"""Columns of :meth:`BusinessTables.item_features` (per candidate item)."""

POPULARITY_WINDOWS_S = (86_400, 7 * 86_400, 30 * 86_400)
"""Trailing windows (seconds before the request) of the time-aware popularity features."""

USER_FEATURES = ("user_cart_wishlist", "user_repurchase", "user_buy_share", "user_days_active", "user_idle") + tuple(f"user_last_{b}" for b in ("pv", "cart", "fav", "buy"))
"""Columns of :func:`user_business_features` (per user, from the recent window)."""

_SHIFT = 32  # key = item << 32 | seconds: one sorted int64 array answers "events on item i in [a, b)"
_SMOOTH = 20.0  # prior weight (pseudo-events) of the smoothed rates


@dataclass
class BusinessTables:
    """Item and category statistics from the training part of a log.

    Attributes:
        item: float32 [M, len(ITEM_FEATURES)] per item id (row 0, padding, is zero).
        event_keys: int64 sorted ``item << 32 | ts`` of every training event, plus each
            event once more under item 0 so that item 0 counts all events (the
            denominator of the popularity shares).
    """

    item: np.ndarray
    event_keys: np.ndarray
    _fixed: tuple[int, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def fit(cls, seqs: Sequences, mask: np.ndarray, item_category: np.ndarray) -> "BusinessTables":
        """Tabulate the funnel statistics of the masked (training) events.

        Args:
            seqs: per-user sequences.
            mask: bool [N]; only these positions count (the training part).
            item_category: [M] category id per item id.

        Returns:
            The tables.
        """
        ts = np.clip(seqs.ts[mask], 0, (1 << _SHIFT) - 1)
        keys = np.concatenate([(seqs.items[mask] << _SHIFT) | ts, ts])
        keys.sort()
        return cls(item_table(seqs, mask, item_category), keys)

    def item_features(self, items: np.ndarray) -> np.ndarray:
        """float32 [..., len(ITEM_FEATURES)] for item ids ``items`` (unknown or padding ids: zeros)."""
        return self.item[_clip(items, len(self.item))]

    def popularity(self, items: np.ndarray, now: np.ndarray) -> np.ndarray:
        """Time-aware popularity: the item's share of all training events in trailing windows before ``now``.

        Only events strictly before the request time count, so a training position
        never sees the popularity its own future made.

        Args:
            items: int [B, C] item ids.
            now: [B] request times (seconds).

        Returns:
            float32 [B, C, len(POPULARITY_WINDOWS_S) + 1]: per window ``log1p(share * 1e4) / 10``,
            and the log count of all earlier events; zeros for padding and unknown ids.
        """
        items = _clip(items, len(self.item)).astype(np.int64)
        fixed = self.fixed_popularity(now)
        if fixed is not None:
            return fixed[items]  # float32, and row 0 (padding, unknown ids) is zero
        hi = np.clip(np.asarray(now, np.int64), 0, (1 << _SHIFT) - 1)[:, None]  # [B, 1]
        keys = items << _SHIFT
        end_item = self._before(keys, hi)  # [B, C]: item events before now
        end_all = self._before(np.zeros_like(hi), hi)  # [B, 1]: all events before now
        out = []
        for w in POPULARITY_WINDOWS_S:
            lo = np.maximum(hi - w, 0)
            n_item = end_item - self._before(keys, lo)
            n_all = end_all - self._before(np.zeros_like(hi), lo)
            out.append(np.log1p(1e4 * n_item / np.maximum(n_all, 1)) / 10.0)
        out.append(np.log1p(end_item - self._before(keys, 0)) / 10.0)
        # Item 0 counts every event (the denominators); as a candidate it is padding.
        return np.where((items > 0)[..., None], np.stack(out, axis=-1), 0.0).astype(np.float32)

    def fix_time(self, now: int) -> None:
        """Tabulate every item's :meth:`popularity` at request time ``now``, so requests at that time read a row.

        A server's requests share one time until live behaviour moves it on (the bundle's
        last event), so this takes several binary searches per candidate off each request.
        """
        self._fixed = None
        table = self.popularity(np.arange(len(self.item))[None, :], np.array([now]))[0]  # [M, windows + 1]
        self._fixed = (int(now), table)

    def fixed_popularity(self, now: np.ndarray) -> np.ndarray | None:
        """The table :meth:`fix_time` made, float32 [M, len(POPULARITY_WINDOWS_S) + 1], when every time in ``now`` is its time; else None."""
        if self._fixed is None or not (np.asarray(now) == self._fixed[0]).all():
            return None
        return self._fixed[1]

    def _before(self, keys: np.ndarray, before: np.ndarray | int) -> np.ndarray:
        """How many event keys sort before ``keys | before`` (differences of two calls count an item's events in a time range)."""
        return np.searchsorted(self.event_keys, keys | before)

    def save(self, path: str) -> None:
        """Write the tables to one ``.npz`` file."""
        with open(path, "wb") as fh:
            np.savez(fh, item=self.item, event_keys=self.event_keys)

    @classmethod
    def load(cls, path: str) -> "BusinessTables":
        """Read what :meth:`save` wrote."""
        try:
            with np.load(path) as npz:
                tables = cls(npz["item"], npz["event_keys"])
        except (zipfile.BadZipFile, KeyError, EOFError, ValueError) as err:
            raise ValueError(f"{path}: unreadable business tables ({err})") from err
        if tables.item.ndim != 2 or tables.item.shape[1] != len(ITEM_FEATURES):
            raise ValueError(f"{path}: business table has shape {tables.item.shape}, expected [items, {len(ITEM_FEATURES)}]")
        return tables


def item_table(seqs: Sequences, mask: np.ndarray, item_category: np.ndarray) -> np.ndarray:
    """The per-item funnel statistics of the masked events (:attr:`BusinessTables.item`).

    Args:
        seqs: per-user sequences.
        mask: bool [N]; only these positions count.
        item_category: [M] category id per item id.

    Returns:
        float32 [M, len(ITEM_FEATURES)]; row 0 (padding) and items without events are zero,
        but for their category's columns.
    """
    num_items, num_users = len(item_category), seqs.num_users
    users, items, behaviors = seqs.user_positions()[mask], seqs.items[mask], seqs.behaviors[mask]
    item = np.zeros((num_items, len(ITEM_FEATURES)), np.float32)
    by_item = _funnel(items, users, behaviors, num_items, num_users)  # [M, 5]
    item[:, :4] = by_item[:, :4]
    item[:, 4] = np.log1p(by_item[:, 4]) / 10.0
    num_categories = max(int(item_category.max(initial=0)) + 1, 1)
    by_cat = _funnel(item_category[items], users, behaviors, num_categories, num_users)  # [categories, 5]
    item[:, 5:8] = by_cat[:, [0, 1, 3]][item_category]
    item[0] = 0.0
    return item


def _funnel(keys: np.ndarray, users: np.ndarray, behaviors: np.ndarray, num_keys: int, num_users: int) -> np.ndarray:
    """Smoothed funnel rates per key (item or category id), from one row per event.

    ``conversion`` = buys / views and ``cart_fav_rate`` = (carts + favs) / views, where
    views = pv events (at least as many as the buys, resp. carts + favs, for logs that
    miss some pv events), both shrunk to the global rate with :data:`_SMOOTH` pseudo-views;
    ``wishlist`` = share of (user, key) pairs carted but never bought and ``repurchase`` =
    share of buyers who bought more than once, both shrunk alike; ``users`` = distinct users.

    Vectorised for 100M-event logs: the (key, user) pairs come from one in-place sort of
    an int64 per event (the pair, then a cart bit and a buy bit), never a grouped frame.

    Args:
        keys, users, behaviors: [E] each event's key, user and behaviour code.
        num_keys, num_users: id space sizes.

    Returns:
        float32 [num_keys, 5]: conversion, cart_fav_rate, wishlist, repurchase, users;
        zero rows for keys without events.
    """
    out = np.zeros((num_keys, 5), np.float32)
    if not len(keys):
        return out
    count = lambda k, w=None: np.bincount(k, weights=w, minlength=num_keys)
    pv, buy = count(keys, behaviors == PV), count(keys, behaviors == BUY)
    cf = count(keys, (behaviors == CART) | (behaviors == FAV))
    code = keys.astype(np.int64)
    code *= num_users
    code += users
    code <<= 2
    code |= (behaviors == CART).astype(np.int64) << 1
    code |= behaviors == BUY
    code.sort()
    starts = np.flatnonzero(np.r_[True, (code[1:] >> 2) != (code[:-1] >> 2)])
    buys = np.add.reduceat(code & 1, starts)  # [P] buys per (key, user) pair
    carted = np.bitwise_or.reduceat(code & 2, starts) > 0
    pair_key = (code[starts] >> 2) // num_users
    del code
    out[:, 0] = _shrunk(buy, np.maximum(pv, buy))
    out[:, 1] = _shrunk(cf, np.maximum(pv, cf))
    out[:, 2] = _shrunk(count(pair_key, carted & (buys == 0)), count(pair_key, carted))
    out[:, 3] = _shrunk(count(pair_key, buys > 1), count(pair_key, buys > 0))
    out[:, 4] = count(pair_key)
    out[count(keys) == 0] = 0.0
    return out


def _shrunk(hits: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """``(hits + S·g) / (trials + S)``: each rate shrunk towards the global rate ``g = Σ hits / Σ trials`` (0 without trials), S = :data:`_SMOOTH`."""
    total = trials.sum()
    rate = hits.sum() / total if total else 0.0
    return (hits + _SMOOTH * rate) / (trials + _SMOOTH)


def user_business_features(window: Window, now: np.ndarray) -> np.ndarray:
    """Per-user business features from the recent behaviour window.

    Args:
        window: [B, L] recent events, right-aligned (0 = padding).
        now: [B] request times.

    Returns:
        float32 [B, len(USER_FEATURES)]: share of carted items never bought in the
        window (cart as wishlist), share of buys on items bought earlier in the window
        (repurchase), share of events that are buys, distinct active days / 30
        (capped at 1), log-hours since the latest event / 10, and the latest event's
        behaviour type one-hot (pv, cart, fav, buy).
    """
    return user_window_columns(kernel_array(window.items), kernel_array(window.behaviors), kernel_array(window.ts), kernel_array(window.lengths), kernel_array(now))


def _clip(ids: np.ndarray, size: int) -> np.ndarray:
    """Ids past a table (catalogue grown after training) read the padding row."""
    return np.where((ids >= 0) & (ids < size), ids, 0)
