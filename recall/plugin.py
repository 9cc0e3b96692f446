"""The recall channel contract and registry: what a channel beside the two-tower provides.

A channel is fitted on the training part of the log, saved into and loaded from a
bundle, and asked for candidates a batch of users at a time. Channels are registered by
name; training fits every registered channel in registration order, a bundle records
the names it holds, and the retriever merges their candidates after the two-tower's, in
that order (an item keeps the first channel that found it). Adding one is a module with
a class that follows :class:`Channel` and a :func:`register_channel` line::

    @register_channel
    class Newest:
        name, default_count = "newest", 10
        ...
"""

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from funnel.events.dataset import Dataset
from funnel.events.sequences import Window
from funnel.recall.lookup import allowed_ids, kernel_array, sorted_lookup


class Excluded:
    """The items each user of a batch must not get, as sorted ``row * M + item`` keys (one sort per batch).

    Args:
        exclude: [B, M] sparse, whose non-zero entries are excluded; or, per user, an
            array of distinct excluded item ids (what a server builds per request,
            without a sparse matrix's set-up cost).
        width: M, when ``exclude`` is a list of arrays.
    """

    def __init__(self, exclude: sp.csr_matrix | Sequence[np.ndarray], width: int | None = None):
        if sp.issparse(exclude):
            exclude = exclude.tocsr()
            per_row, cols, self.width = np.diff(exclude.indptr), exclude.indices, exclude.shape[1]
        else:
            if width is None:
                raise ValueError("Excluded needs the catalogue width with per-user id arrays")
            per_row = np.array([len(ids) for ids in exclude], np.int64)
            cols, self.width = (np.concatenate(exclude) if len(exclude) else np.zeros(0, np.int64)), width
        self.most_per_row = int(per_row.max(initial=0))
        self.keys = np.sort(np.repeat(np.arange(len(per_row), dtype=np.int64), per_row) * self.width + cols)

    @classmethod
    def from_keys(cls, keys: np.ndarray, width: int, most_per_row: int) -> "Excluded":
        """Keys built elsewhere (:meth:`server.history.UserHistory.assemble`).

        Args:
            keys: sorted int64 ``row * width + item``, one per excluded (row, item) pair.
            width: the catalogue size.
            most_per_row: the most keys of one row.
        """
        out = cls.__new__(cls)
        out.keys, out.width, out.most_per_row = keys, width, most_per_row
        return out

    def pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """bool: whether item ``cols[i]`` is excluded for user ``rows[i]``."""
        if not len(self.keys):
            return np.zeros(np.broadcast_shapes(np.shape(rows), np.shape(cols)), dtype=bool)
        return sorted_lookup(self.keys, np.asarray(rows, np.int64) * self.width + cols)[1]

    def ids(self, ids: np.ndarray) -> np.ndarray:
        """bool [B, K]: whether each id in row b of ``ids`` is excluded for user b."""
        return self.pairs(np.arange(ids.shape[0])[:, None], ids)


@dataclass(frozen=True)
class ChannelQuery:
    """One batch of users, as every channel sees it.

    Attributes:
        window: the users' recent behaviour [B, n], most recent last, 0 = padding.
        now: [B] request times.
        user_vecs: [B, d] the two-tower's user vectors.
        exclude: the items each user must not get.
        category: only items of this category id, or None.
        item_category: [M] category id per item id.
        recent: how many of the latest events a history-based channel looks at.
    """

    window: Window
    now: np.ndarray
    user_vecs: np.ndarray
    exclude: Excluded
    category: int | None
    item_category: np.ndarray
    recent: int

    def allowed(self, ids: np.ndarray, k: int) -> np.ndarray:
        """The first ``k`` ids of each row that the user may get (not excluded, of the asked category), order kept.

        Args:
            ids: [B, K] item ids, best first, 0 = padding.
            k: ids kept per row.

        Returns:
            int64 [B, min(K, k)], 0 = padding.
        """
        return allowed_ids(kernel_array(ids), self.exclude.keys, self.exclude.width, self.item_category, self.category_code, k)

    @property
    def category_code(self) -> int:
        """:attr:`category` for the compiled lookups: -1 for every category."""
        return -1 if self.category is None else int(self.category)


@runtime_checkable
class Channel(Protocol):
    """A recall channel beside the two-tower.

    Attributes:
        name: its name in bundles, candidate counts and responses.
        default_count: candidates asked of it unless the recall config says otherwise.
    """

    name: ClassVar[str]
    default_count: ClassVar[int]

    @classmethod
    def fit(cls, data: Dataset, mask: np.ndarray) -> "Channel":
        """Fit on the training part of the log: ``data.seqs`` positions where ``mask`` (bool [N]) is set."""

    def candidates(self, query: ChannelQuery, k: int) -> np.ndarray:
        """Up to ``k`` candidates per user, best first: int64 [B, <=k], 0 = padding, nothing excluded (see :meth:`ChannelQuery.allowed`)."""

    def save(self, directory: str) -> None:
        """Write the fitted state into the bundle's ``recall`` directory, in files named after :attr:`name`."""

    @classmethod
    def load(cls, directory: str) -> "Channel":
        """Read what :meth:`save` wrote."""


_CHANNELS: dict[str, type] = {}


def _builtins() -> dict[str, type]:
    """The registry, with the built-in channels (:mod:`recall.channels`) registered first, whatever was imported first."""
    importlib.import_module("funnel.recall.channels")
    return _CHANNELS


def register_channel(cls: type) -> type:
    """Register a channel class under its ``name`` (usable as a class decorator), after the registered ones.

    Raises:
        ValueError: the name is taken, reserved (``none``, ``two_tower``, ``recent``), or
            the class lacks part of :class:`Channel`.
    """
    _builtins()
    name = getattr(cls, "name", None)
    missing = [a for a in ("name", "default_count", "fit", "candidates", "save", "load") if not hasattr(cls, a)]
    if missing:
        raise ValueError(f"{cls.__qualname__} is not a recall channel: it lacks {', '.join(missing)}")
    if name in _CHANNELS or name in ("none", "two_tower", "recent") or not name:
        raise ValueError(f"recall channel name {name!r} is taken or reserved")
    _CHANNELS[name] = cls
    return cls


def unregister_channel(name: str) -> None:
    """Remove a registered channel (a test's, or a plugin being unloaded)."""
    del _CHANNELS[name]


def registered() -> dict[str, type]:
    """Channel name -> class, in registration order (the order training fits and merges them)."""
    return dict(_builtins())


def channel_class(name: str) -> type:
    """The registered class of channel ``name``.

    Raises:
        KeyError: naming the channel and the registered ones.
    """
    try:
        return _builtins()[name]
    except KeyError:
        raise KeyError(f"recall channel {name!r} is not registered (registered: {', '.join(_CHANNELS) or 'none'})") from None


def fit_channels(data: Dataset, mask: np.ndarray, like: Sequence[Channel] | None = None) -> list:
    """Channels fitted on the positions of ``data.seqs`` where ``mask`` is set.

    Args:
        data, mask: the encoded log and its training positions.
        like: refit channels of these kinds, in their order (a bundle's, or a retriever's);
            default every registered channel, in registration order.

    Returns:
        The fitted channels.
    """
    kinds = [type(c) for c in like] if like is not None else list(_builtins().values())
    return [cls.fit(data, mask) for cls in kinds]


def find_channel(channels: Sequence[Channel], name: str) -> Channel:
    """The channel called ``name`` among ``channels``.

    Raises:
        KeyError: naming the channel and those there are.
    """
    for channel in channels:
        if channel.name == name:
            return channel
    raise KeyError(f"no recall channel {name!r} here (channels: {', '.join(c.name for c in channels) or 'none'})")
