"""Plain request/response types between the gRPC layer and the recommendation engine.

The gRPC servicer converts protobuf messages into these and back, so the engine
never sees protobuf and can be driven directly by tools and tests.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    """One behaviour not yet in the bundle's log."""

    item_id: str
    behavior: str
    timestamp: int


@dataclass(frozen=True)
class RecommendQuery:
    """A validated Recommend request (k in range, known behaviour names, non-empty user id)."""

    user_id: str
    k: int
    recent_events: tuple[Event, ...] = ()
    exclude_item_ids: tuple[str, ...] = ()
    include_seen: bool = False
    category: str | None = None
    request_id: str = ""


@dataclass(frozen=True)
class Recommendation:
    """One ranked item with the scores and channel that produced it."""

    item_id: str
    score: float
    recall_score: float
    channel: str
    title: str = ""
    category: str = ""


@dataclass
class RecommendResult:
    """Ranked items (score descending) plus per-stage timings in microseconds."""

    items: list[Recommendation]
    model_version: str
    index_version: str
    timings_us: dict[str, int] = field(default_factory=dict)


class BadQuery(ValueError):
    """Input that passed the protocol checks but is wrong for this bundle (e.g. an unknown category)."""
