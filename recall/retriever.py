"""The recall stage: two-tower ANN search plus the registered channels (:mod:`recall.plugin`), merged.

Every candidate carries the channel that surfaced it first (the two-tower, then each
channel in the retriever's order) and one comparable recall score: the two-tower inner
product of the user and the item, whichever channel found it.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from funnel.events.sequences import Window
from funnel.recall.index import search
from funnel.recall.lookup import kernel_array, merge_rows
from funnel.recall.model import USER_INPUTS, TwoTower, frozen_for_inference, user_arrays
from funnel.recall.plugin import Channel, ChannelQuery, Excluded, find_channel, registered
from funnel.recall.runtime import OnnxModel

TWO_TOWER = "two_tower"
"""The two-tower channel's name; channel id 1 (0 = padding), the other channels follow it."""


@dataclass
class RecallConfig:
    """How many candidates each channel contributes (before de-duplication), by channel name.

    The defaults merge to about 200 candidates, what the ranker can score within a
    millisecond. On MovieLens-100k (three seeds) two-tower 150, co-visitation 50 and
    popularity 20 give the same final NDCG@10 as 200/100/50 (0.1290 against 0.1291) at
    two thirds of the ranking cost.

    Attributes:
        counts: channel name -> candidates; a channel not named here contributes its
            ``default_count``, 0 turns a channel off.
        recent: the latest events a history-based channel (co-visitation) looks at.
    """

    counts: dict[str, int] = field(default_factory=lambda: {TWO_TOWER: 150})
    recent: int = 5

    def count(self, name: str) -> int:
        """Candidates asked of channel ``name``."""
        return self.counts[name] if name in self.counts else registered()[name].default_count

    def resolved(self, names: Sequence[str]) -> "RecallConfig":
        """The config with an explicit count for the two-tower and every channel in ``names`` (what a bundle records)."""
        return RecallConfig({n: self.count(n) for n in (TWO_TOWER, *names)}, self.recent)

    def to_dict(self) -> dict:
        """``{channel: count, ..., "recent": n}``, the manifest's ``recall_config``."""
        return {**self.counts, "recent": self.recent}

    @classmethod
    def from_dict(cls, d: dict) -> "RecallConfig":
        """Inverse of :meth:`to_dict` (a subset of channels is fine: the rest take their defaults)."""
        counts = {k: int(v) for k, v in d.items() if k != "recent"}
        defaults = cls()
        return cls({**defaults.counts, **counts}, int(d.get("recent", defaults.recent)))

    @staticmethod
    def parse_counts(spec: str) -> dict[str, int]:
        """Per-channel counts from ``"two_tower=150,covisit=50,popular=20"`` (any subset of the channels, and ``recent``).

        Args:
            spec: comma-separated ``name=count`` pairs, names among ``two_tower``, the
                registered channels and ``recent``; counts are integers >= 0 (0 turns a
                channel off); ``two_tower`` and ``recent`` at least 1.

        Returns:
            name -> count, to apply with :meth:`from_dict`.

        Raises:
            ValueError: naming the bad pair and what is allowed.
        """
        allowed = (TWO_TOWER, *registered(), "recent")
        counts: dict[str, int] = {}
        for pair in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = (part.strip() for part in pair.partition("="))
            if not sep or name not in allowed:
                raise ValueError(f"{pair!r}: expected FIELD=COUNT with FIELD one of {', '.join(allowed)}")
            if not (value.isascii() and value.isdigit()):
                raise ValueError(f"{pair!r}: the count must be a whole number >= 0")
            counts[name] = int(value)
        if not counts:
            raise ValueError(f"no counts in {spec!r}; expected e.g. two_tower=150,covisit=50,popular=20")
        for name in (TWO_TOWER, "recent"):
            if counts.get(name, 1) < 1:
                raise ValueError(f"{name} must be at least 1, got {counts[name]}")
        return counts


@dataclass
class Candidates:
    """Merged candidates, best recall score first; every array is [B, C] except ``user_vecs``.

    Attributes:
        items: item ids, 0 = padding.
        scores: two-tower inner products, -inf for padding.
        channels: index into the retriever's :attr:`Retriever.channel_names`, 0 for padding.
        user_vecs: [B, d] the user vectors the scores came from.
    """

    items: np.ndarray
    scores: np.ndarray
    channels: np.ndarray
    user_vecs: np.ndarray


class Retriever:
    """Runs the two-tower and the other recall channels for a batch of users and merges their candidates.

    Args:
        model: the two-tower model.
        item_vecs: [M, d] item vectors (row 0 = padding).
        index: the FAISS index over the recommendable rows of ``item_vecs``.
        channels: the other channels, in merge order (:func:`recall.plugin.fit_channels`).
        item_category: [M] category id per item id.
        config: candidate counts per channel.
        recommendable: bool [M], the items the index holds (default every item but
            padding); the exact per-category path keeps to the same set.
    """

    def __init__(
        self,
        model: TwoTower,
        item_vecs: np.ndarray,
        index,
        channels: Sequence[Channel],
        item_category: np.ndarray,
        config: RecallConfig | None = None,
        recommendable: np.ndarray | None = None,
    ):
        self.model = model.eval()
        self.device = next(model.parameters()).device  # looked up once: a parameter walk per request costs ~50 us
        self._encode: Callable[..., np.ndarray] = self._torch_encoder(model.user_tower)
        self.item_vecs = item_vecs
        self.index = index
        self.channels = list(channels)
        self.item_category = item_category
        self.channel_names: tuple[str, ...] = ("none", TWO_TOWER, *(c.name for c in self.channels))
        """Channel id -> name: 0 is padding, 1 the two-tower, then :attr:`channels` in order."""
        self.config = (config or RecallConfig()).resolved(self.channel_names[2:])
        # The exact category path must return only what the index holds.
        self.recommendable = recommendable if recommendable is not None else np.arange(len(item_vecs)) > 0

    def channel(self, name: str) -> Channel:
        """The channel called ``name`` (:func:`recall.plugin.find_channel`)."""
        return find_channel(self.channels, name)

    def freeze(self) -> None:
        """Encode users with a frozen TorchScript copy of the user tower from now on (:func:`recall.model.frozen_for_inference`).

        For a finished bundle; a retriever whose two-tower is still training must not be
        frozen, since the copy would not follow its weights.
        """
        example = tuple(torch.ones(1, self.model.cfg.history, dtype=torch.long, device=self.device) for _ in range(4))
        self._encode = self._torch_encoder(frozen_for_inference(self.model.user_tower, example))

    def use_onnx(self, path: str) -> None:
        """Encode users with ONNX Runtime over the user tower's export at ``path`` (:func:`recall.model.export_user_tower`) from now on."""
        session = OnnxModel(path)
        self._encode = lambda *arrays: session(**dict(zip(USER_INPUTS, arrays)))[0]

    def _torch_encoder(self, tower: torch.nn.Module) -> Callable[..., np.ndarray]:
        def encode(*arrays: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return tower(*(torch.from_numpy(a).to(self.device) for a in arrays)).cpu().numpy()

        return encode

    def user_vectors(self, window: Window, now: np.ndarray) -> np.ndarray:
        """User-tower vectors for a batch of windows as of the request times ``now`` [B]. Returns [B, d] float32."""
        return self._encode(*user_arrays(window, now))

    def retrieve(
        self,
        window: Window,
        now: np.ndarray,
        exclude: "sp.csr_matrix | Excluded",
        category: int | None = None,
        channels: Sequence[str] | None = None,
        two_tower: int = 0,
    ) -> Candidates:
        """Candidates for each user in the batch.

        Args:
            window: the users' recent behaviour, [B, n].
            now: [B] request times (time gaps are measured to them).
            exclude: [B, M] sparse, or :class:`Excluded`; these items are never returned
                (seen or excluded by the caller).
            category: keep only items of this category id (all channels).
            channels: names of the channels to run (default all; evaluation runs them
                one at a time too).
            two_tower: ask the two-tower channel for at least this many candidates
                (a request for more items than the configured count).

        Returns:
            Merged, de-duplicated candidates sorted by recall score.
        """
        cfg = self.config
        run = set(self.channel_names[1:] if channels is None else channels)
        uv = self.user_vectors(window, now)
        exclude = exclude if isinstance(exclude, Excluded) else Excluded(exclude)
        query = ChannelQuery(window, now, uv, exclude, category, self.item_category, cfg.recent)
        parts: list[tuple[np.ndarray, int]] = []
        if TWO_TOWER in run:
            parts.append((self._two_tower(query, max(cfg.count(TWO_TOWER), two_tower)), 1))
        for code, channel in enumerate(self.channels, 2):
            if channel.name in run and cfg.count(channel.name):
                parts.append((channel.candidates(query, cfg.count(channel.name)), code))
        return self._merge(uv, parts)

    def _two_tower(self, query: ChannelQuery, k: int) -> np.ndarray:
        uv, exclude, category = query.user_vecs, query.exclude, query.category
        if category is not None:
            # A category is a small slice of the catalogue: score it exactly.
            pool = np.flatnonzero((self.item_category == category) & self.recommendable)
            scores = uv @ self.item_vecs[pool].T  # [B, |pool|]
            ids = np.broadcast_to(pool, scores.shape)
            scores[exclude.ids(ids)] = -np.inf
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.where(np.isfinite(np.take_along_axis(scores, top, axis=1)), pool[top], 0)
        ids, _ = search(self.index, uv, min(k + exclude.most_per_row, self.index.ntotal))
        return query.allowed(np.where(ids < 0, 0, ids), k)

    def _merge(self, uv: np.ndarray, parts: list[tuple[np.ndarray, int]]) -> Candidates:
        b = len(uv)
        if not parts:
            empty = np.zeros((b, 0), np.int64)
            return Candidates(empty, empty.astype(np.float32), empty.astype(np.int8), uv)
        ids = np.concatenate([p for p, _ in parts], axis=1)  # [B, total]
        chan = np.concatenate([np.full(p.shape, c, np.int8) for p, c in parts], axis=1)
        # First occurrence wins, so the earlier (higher-priority) channel keeps the item.
        items, scores, channels = merge_rows(kernel_array(ids), chan, uv, self.item_vecs)
        return Candidates(items, scores, channels, uv)
