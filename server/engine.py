"""The recommendation engine behind the gRPC service: one bundle, both stages, raw ids in and out."""

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from funnel.bundle import Bundle, load_bundle
from funnel.events.eventlog import UserEvent
from funnel.events.schema import BEHAVIORS
from funnel.events.vocab import PAD
from funnel.rank.pipeline import Ranked
from funnel.recall.retriever import TWO_TOWER
from funnel.server.history import UserHistory
from funnel.server.query import Attended, BadQuery, Recommendation, RecommendQuery, RecommendResult
from funnel.server.state import StateUnavailable, UserState

EXPLAIN_TOP = 3
"""Attended behaviours returned per item."""


class Engine:
    """Answers :class:`RecommendQuery` objects from a loaded bundle.

    The request time ("now", from which time gaps are measured) is the later of the
    bundle's last event and the request's newest event, so replayed logs and live
    traffic both see gaps like the ones the ranker trained on.

    Args:
        bundle: the loaded bundle.
        state: users' logged behaviour (see :mod:`server.state`), shared with the
            engines of later bundles; ``None`` serves without live behaviour and
            refuses :meth:`log_events`.
        runtime: ``onnx`` (ONNX Runtime, no torch work per request) or ``torch``
            (:meth:`bundle.Bundle.pipeline`).
    """

    def __init__(self, bundle: Bundle, state: UserState | None = None, runtime: str = "onnx"):
        self.bundle = bundle
        self.state = state
        self.history = UserHistory(bundle.data, state, bundle.data_end)
        self.pipeline = bundle.pipeline(runtime)
        data = bundle.data
        for vocab in (data.users, data.items, data.categories):
            vocab.prepare_lookup()  # here, not in the first request
        self._titles = data.item_title
        self._category_names = data.categories.decode(data.item_category)
        self._channel_names = np.array(self.pipeline.retriever.channel_names, dtype=object)  # channel id -> name, gathered per answer

    @classmethod
    def load(cls, path: str, state: UserState | None = None, candidates: dict[str, int] | None = None, runtime: str = "onnx") -> "Engine":
        """Load the bundle at ``path`` (root or version directory), serving ``state``'s live behaviour.

        Args:
            path: bundle root or version directory.
            state: see the class docstring.
            candidates: per-channel candidate counts that replace the bundle's
                (:func:`bundle.load_bundle`).
            runtime: see the class docstring.
        """
        return cls(load_bundle(path, candidates=candidates), state, runtime)

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
            BadQuery: for a category filter naming no known category, or head weights
                naming a head this bundle's ranker does not have.
        """
        result = self.recommend_batch([query])[0]
        if isinstance(result, BadQuery):
            raise result
        return result

    def recommend_batch(self, queries: Sequence[RecommendQuery]) -> list[RecommendResult | BadQuery]:
        """Rank items for several users with one pass of each stage per group of alike queries.

        Queries that share a category filter, a two-tower candidate count and head
        weights form one group: one user-tower forward, one index search and one ranking forward. A
        query's answer does not depend on what it was batched with.

        Args:
            queries: validated queries.

        Returns:
            One entry per query, in order: its result, or the :class:`BadQuery` it raised
            (an error in one query does not fail the others).
        """
        results: list[RecommendResult | BadQuery | None] = [None] * len(queries)
        groups: dict[tuple, list[int]] = {}
        for i, query in enumerate(queries):
            try:
                groups.setdefault(self._batch_key(query), []).append(i)
            except BadQuery as err:
                results[i] = err
        for (category, two_tower, head_weights, explain), rows in groups.items():
            for i, result in zip(rows, self._recommend_group([queries[i] for i in rows], category, two_tower, head_weights, explain)):
                results[i] = result
        return results

    def _batch_key(self, query: RecommendQuery) -> tuple:
        """What must be equal for queries to share one pass: the category id, the two-tower count, the head weights and whether to explain."""
        category = None
        if query.category is not None:
            category = int(self.bundle.data.categories.encode([query.category])[0])
            if category == PAD:
                raise BadQuery(f"unknown category {query.category!r}")
        heads = self.pipeline.ranker.cfg.heads
        missing = [head for head, _ in query.head_weights if head not in heads]
        if missing:
            raise BadQuery(f"head_weights names {missing[0]!r}, which this bundle's ranker does not have (its heads: {', '.join(heads)})")
        return category, max(self.pipeline.retriever.config.count(TWO_TOWER), query.k), query.head_weights, query.explain

    def _recommend_group(
        self, queries: list[RecommendQuery], category: int | None, two_tower: int, head_weights: tuple[tuple[str, float], ...], explain: bool
    ) -> list[RecommendResult]:
        started = time.perf_counter()
        hist = self.history.assemble(queries, self.pipeline.history)
        assembled = time.perf_counter()
        weights = dict(head_weights) or None
        out = self.pipeline.recommend(hist.window, hist.now, hist.activity, hist.exclude, category, head_weights=weights, two_tower=two_tower, attention=explain)
        effects = None
        if explain:
            effects = self.pipeline.event_effects(hist.window, hist.now, hist.activity, out.ranked, max(q.k for q in queries), weights)  # [B, k, L]
        # Stage times are the group's: every query in it waited for the whole pass. Recall
        # includes assembling the users' histories.
        timings = {"recall": _us(assembled - started + out.recall_s), "rank": _us(out.rank_s), "total": _us(time.perf_counter() - started)}
        bases = [_basis(user, activity) for user, activity in zip(hist.users.tolist(), hist.activity.tolist())]
        return [
            self._result(query, out.ranked, row, timings, basis, None if effects is None else effects[row])
            for row, (query, basis) in enumerate(zip(queries, bases))
        ]

    def _result(self, query: RecommendQuery, ranked: Ranked, row: int, timings: dict[str, int], basis: str, effects: np.ndarray | None) -> RecommendResult:
        """Row ``row`` of a ranked batch as one query's answer; ``effects`` [k, L] of its events on its first items explain them."""
        keep = np.flatnonzero(ranked.items[row] > 0)[: query.k]
        items = ranked.items[row, keep]
        # Python lists up front: per-element numpy scalar access costs more than the conversion.
        ids = self.bundle.data.items.decode(items).tolist()
        scores, recall_scores = ranked.scores[row, keep].tolist(), ranked.recall_scores[row, keep].tolist()
        channels = self._channel_names[ranked.channels[row, keep]].tolist()
        titles, categories = self._titles[items].tolist(), self._category_names[items].tolist()
        heads = {head: p[row, keep].tolist() for head, p in ranked.head_scores.items()}
        because = self._because(ranked, row, keep, effects) if effects is not None else [()] * len(keep)
        recs = [
            Recommendation(
                item_id=str(ids[j]),
                score=scores[j],
                recall_score=recall_scores[j],
                channel=channels[j],
                title=str(titles[j] or ""),
                category=str(categories[j]),
                because=because[j],
                head_scores={head: p[j] for head, p in heads.items()},
            )
            for j in range(len(keep))
        ]
        return RecommendResult(recs, self.model_version, self.index_version, dict(timings), basis)

    def _because(self, ranked: Ranked, row: int, cols: np.ndarray, effects: np.ndarray) -> list[tuple[Attended, ...]]:
        """For each of row ``row``'s items at ``cols``, the past behaviours that raise its score most, largest effect first.

        Args:
            ranked: the ranked batch.
            row: the query's row.
            cols: [K] the returned items' columns (the first K, padding skipped).
            effects: [k >= K, L] each event's effect on the row's first items (:meth:`rank.pipeline.TwoStage.event_effects`).
        """
        hist = ranked.history_items[row]  # [L]
        effect = effects[cols]  # [K, L]; padding events have no effect
        top = np.argsort(-effect, axis=1, kind="stable")[:, :EXPLAIN_TOP]  # [K, n]
        gains = np.take_along_axis(effect, top, axis=1).tolist()
        weights = np.take_along_axis(ranked.attention[row, cols], top, axis=1).tolist()
        ids = self.bundle.data.items.decode(hist[top].ravel()).reshape(top.shape).tolist()
        behaviors, ts = ranked.history_behaviors[row][top].tolist(), ranked.history_ts[row][top].tolist()
        out = []
        for per_item in zip(ids, behaviors, ts, weights, gains):
            # The same behaviour logged twice (same item, type and second) is one line.
            lines = {(str(i), BEHAVIORS[b - 1], t): (w, g) for i, b, t, w, g in reversed(list(zip(*per_item))) if g > 0}
            out.append(tuple(Attended(i, b, t, w, g) for (i, b, t), (w, g) in sorted(lines.items(), key=lambda kv: -kv[1][1])))
        return out

    def log_events(self, events: Sequence[UserEvent]) -> int:
        """Append behaviour to the users' state; later queries for those users see it.

        Events without a category get the bundle's category for their item, so a later
        training run can place them even when the caller did not say.

        Args:
            events: validated events, raw ids.

        Returns:
            How many of them are on items this bundle does not know (stored all the same).

        Raises:
            StateUnavailable: this engine has no state, or its store cannot be reached.
        """
        if self.state is None:
            raise StateUnavailable("this server keeps no user state, so it cannot log events")
        data = self.bundle.data
        items = data.items.encode([e.item_id for e in events])
        names = self._category_names[items]
        events = [e if e.category_id or not item else dataclasses.replace(e, category_id=str(name)) for e, item, name in zip(events, items, names)]
        self.state.append(events)
        return int((items == PAD).sum())


def _basis(user: int, activity: int) -> str:
    """What a list is built from (:data:`server.query.BASES`): the bundle's history, only newer events, or nothing.

    Args:
        user: the user's bundle id (:data:`PAD` if the bundle does not know the user).
        activity: events in the user's merged history.
    """
    if user != PAD:
        return "known"
    return "recent_events" if activity else "popularity"


def _us(seconds: float) -> int:
    return int(seconds * 1e6)
