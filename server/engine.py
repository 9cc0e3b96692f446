"""The recommendation engine behind the gRPC service: one bundle, both stages, raw ids in and out."""

import logging
import time

import numpy as np
import scipy.sparse as sp

from events.schema import BEHAVIOR_CODE
from events.sequences import Sequences
from events.vocab import PAD
from recall.retriever import CHANNELS
from server.bundle import Bundle, load_bundle
from server.query import BadQuery, RecommendQuery, RecommendResult, Recommendation

log = logging.getLogger("funnel.engine")


class Engine:
    """Answers :class:`RecommendQuery` objects from a loaded bundle.

    The request time ("now", from which time gaps are measured) is the later of the
    bundle's last event and the request's newest event, so replayed logs and live
    traffic both see gaps like the ones the ranker trained on.
    """

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.pipeline = bundle.pipeline()
        data = bundle.data
        self._data_end = int(data.seqs.ts.max()) if len(data.seqs) else 0
        self._titles = data.item_title
        self._category_names = data.categories.decode(data.item_category)

    @classmethod
    def load(cls, path: str) -> "Engine":
        """Load the bundle at ``path`` (root or version directory)."""
        return cls(load_bundle(path))

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    @property
    def index_version(self) -> str:
        return self.bundle.index_version

    def recommend(self, query: RecommendQuery) -> RecommendResult:
        """Rank items for one user.

        Args:
            query: a validated query; unknown users are served from their
                ``recent_events`` and popularity (cold start).

        Returns:
            Up to ``query.k`` items, best first, with per-stage timings.

        Raises:
            BadQuery: for a category filter naming no known category.
        """
        started = time.perf_counter()
        data = self.bundle.data
        category = None
        if query.category is not None:
            category = int(data.categories.encode([query.category])[0])
            if category == PAD:
                raise BadQuery(f"unknown category {query.category!r}")
        seqs = self._user_sequence(query)
        window = seqs.user_window(np.array([0]), self.pipeline.history)
        now = np.array([max(self._data_end, int(seqs.ts.max()) if len(seqs) else 0)])
        exclude = self._exclude(query, seqs)
        candidates = self.pipeline.retriever.retrieve(
            window.tail(self.pipeline.retriever.model.cfg.history), now, exclude, category, two_tower=query.k
        )
        recalled = time.perf_counter()
        ranked = self.pipeline.rank(window, now, np.array([len(seqs)]), candidates)
        done = time.perf_counter()
        items = ranked.items[0]
        keep = np.flatnonzero(items > 0)[: query.k]
        ids = data.items.decode(items[keep])
        recs = [
            Recommendation(
                item_id=str(ids[j]),
                score=float(ranked.scores[0, i]),
                recall_score=float(ranked.recall_scores[0, i]),
                channel=CHANNELS[ranked.channels[0, i]],
                title=str(self._titles[items[i]] or ""),
                category=str(self._category_names[items[i]]),
            )
            for j, i in enumerate(keep)
        ]
        timings = {"recall": _us(recalled - started), "rank": _us(done - recalled), "total": _us(time.perf_counter() - started)}
        return RecommendResult(recs, self.model_version, self.index_version, timings)

    def _user_sequence(self, query: RecommendQuery) -> Sequences:
        """The user's bundle history plus this request's recent events, as one user's sequence."""
        data = self.bundle.data
        user = int(data.users.encode([query.user_id])[0])
        lo, hi = (data.seqs.offsets[user], data.seqs.offsets[user + 1]) if user != PAD else (0, 0)
        recent = query.recent_events
        items = data.items.encode([e.item_id for e in recent]) if recent else np.zeros(0, np.int64)
        known = items != PAD
        if not known.all():
            # Items newer than the bundle cannot be embedded yet; they count once a rebuild includes them.
            log.debug("request %s: %d recent events on unknown items ignored", query.request_id, int((~known).sum()))
        behaviors = np.array([BEHAVIOR_CODE[e.behavior] for e in recent], dtype=np.int8)[known]
        ts = np.array([e.timestamp for e in recent], dtype=np.int64)[known]
        items = items[known]
        n = hi - lo + len(items)
        return Sequences.from_encoded(
            np.zeros(n, np.int64),
            np.concatenate([data.seqs.items[lo:hi], items]),
            np.concatenate([data.seqs.categories[lo:hi], data.item_category[items]]),
            np.concatenate([data.seqs.behaviors[lo:hi], behaviors]),
            np.concatenate([data.seqs.ts[lo:hi], ts]),
            1,
        )

    def _exclude(self, query: RecommendQuery, seqs: Sequences) -> sp.csr_matrix:
        data = self.bundle.data
        excluded = data.items.encode(list(query.exclude_item_ids)) if query.exclude_item_ids else np.zeros(0, np.int64)
        if not query.include_seen:
            excluded = np.concatenate([excluded, seqs.items])
        excluded = np.unique(excluded[excluded != PAD])
        return sp.csr_matrix((np.ones(len(excluded), np.float32), (np.zeros(len(excluded), np.int64), excluded)), shape=(1, data.items.size))


def _us(seconds: float) -> int:
    return int(seconds * 1e6)
