"""The ``funnel.v1.Recommender`` servicer: protocol checks and protobuf <-> dataclass conversion.

The engine only ever sees :class:`server.query.RecommendQuery`; everything that can be
rejected from the request alone is rejected here, before the engine runs.
"""

import asyncio
import logging
import math
import time
from concurrent.futures import Executor

import grpc

from funnel.events.eventlog import UserEvent
from funnel.events.schema import BEHAVIORS
from funnel.rank.model import HEADS
from funnel.server.batching import DeadlineExpired, MicroBatcher, Overloaded
from funnel.server.holder import BundleRefused, EngineHolder
from funnel.server.metrics import Metrics
from funnel.server.peers import PeerUnavailable, Peers
from funnel.server.query import BadQuery, Event, RecommendQuery, RecommendResult
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc
from funnel.server.state import StateUnavailable

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_RECENT_EVENTS = 1000
MAX_LOG_EVENTS = 10_000
MIN_TIMESTAMP = 946_684_800
"""2000-01-01T00:00:00Z: the earliest event time either rpc accepts (a 0, a negative or a
millisecond-scale mistake lands far outside the log's time range and skews time gaps)."""
MAX_FUTURE_S = 86_400
"""Events may lie at most one day past the server's clock (clock skew), never further."""


def check_event(where: str, event: recommender_pb2.Event, now: float) -> None:
    """The rules every event obeys, in ``recent_events`` and in ``LogEvents`` alike.

    Args:
        where: the event's place in the request, for the message (``events[3]``).
        event: the wire event.
        now: the server's clock (unix seconds).

    Raises:
        BadQuery: naming the field and what is allowed.
    """
    if not event.item_id.strip():
        raise BadQuery(f"{where}.item_id is required (got an empty or blank string)")
    if event.behavior not in BEHAVIORS:
        raise BadQuery(f"{where}.behavior {event.behavior!r} is not one of {', '.join(BEHAVIORS)}")
    latest = int(now) + MAX_FUTURE_S
    if not MIN_TIMESTAMP <= event.timestamp <= latest:
        raise BadQuery(
            f"{where}.timestamp must be unix seconds from {MIN_TIMESTAMP} (2000-01-01) to {latest} (the server's clock plus one day), got {event.timestamp}"
        )
SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name


def validate(request: recommender_pb2.RecommendRequest) -> RecommendQuery:
    """Check a request against the protocol and convert it to a query.

    Args:
        request: the wire request.

    Returns:
        The equivalent query; an unset ``category`` becomes ``None``.

    Raises:
        BadQuery: naming the offending field and what is allowed.
    """
    if not request.user_id.strip():
        raise BadQuery("user_id is required (got an empty or blank string)")
    if request.k == 0:
        raise BadQuery(f"k is required: set it to the number of items wanted, 1..{MAX_K}")
    if not 1 <= request.k <= MAX_K:
        raise BadQuery(f"k must be in 1..{MAX_K}, got {request.k}")
    if len(request.recent_events) > MAX_RECENT_EVENTS:
        raise BadQuery(f"recent_events holds {len(request.recent_events)} events; at most {MAX_RECENT_EVENTS} are accepted (send older ones with LogEvents)")
    now = time.time()
    for i, event in enumerate(request.recent_events):
        check_event(f"recent_events[{i}]", event, now)
    for head, weight in request.head_weights.items():
        if head not in HEADS:
            raise BadQuery(f"head_weights names unknown head {head!r}; heads are {', '.join(HEADS)}")
        if not math.isfinite(weight) or weight < 0:
            raise BadQuery(f"head_weights[{head!r}] must be a finite weight >= 0, got {weight}")
    return RecommendQuery(
        user_id=request.user_id,
        k=request.k,
        recent_events=tuple(Event(e.item_id, e.behavior, e.timestamp) for e in request.recent_events),
        exclude_item_ids=tuple(request.exclude_item_ids),
        include_seen=request.include_seen,
        category=request.category if request.HasField("category") else None,
        request_id=request.request_id,
        head_weights=tuple(sorted(request.head_weights.items())),
        explain=request.explain,
    )


def validate_events(request: recommender_pb2.LogEventsRequest) -> list[UserEvent]:
    """Check a LogEvents request; the whole batch is refused if one event is bad.

    Args:
        request: the wire request.

    Returns:
        The events, raw ids, in request order.

    Raises:
        BadQuery: naming the first offending event's index and field.
    """
    n = len(request.events)
    if not 1 <= n <= MAX_LOG_EVENTS:
        raise BadQuery(f"events must hold 1..{MAX_LOG_EVENTS} events, got {n}")
    now = time.time()
    for i, event in enumerate(request.events):
        if not event.user_id.strip():
            raise BadQuery(f"events[{i}].user_id is required (got an empty or blank string)")
        check_event(f"events[{i}]", event, now)
    return [UserEvent(e.user_id, e.item_id, e.category_id, e.behavior, e.timestamp) for e in request.events]


def to_response(result: RecommendResult, request_id: str) -> recommender_pb2.RecommendResponse:
    """Convert an engine result to the wire response.

    Args:
        result: the engine's answer.
        request_id: echoed back to the caller.

    Returns:
        The response, items in the engine's order.
    """
    timings = result.timings_us
    return recommender_pb2.RecommendResponse(
        items=[
            recommender_pb2.ScoredItem(
                item_id=r.item_id,
                score=r.score,
                recall_score=r.recall_score,
                channel=r.channel,
                title=r.title,
                category=r.category,
                because=[recommender_pb2.AttendedBehavior(item_id=a.item_id, behavior=a.behavior, timestamp=a.timestamp, weight=a.weight, effect=a.effect) for a in r.because]
                if r.because
                else None,
                head_scores=r.head_scores,
            )
            for r in result.items
        ],
        model_version=result.model_version,
        index_version=result.index_version,
        timings=recommender_pb2.StageTimings(
            recall_us=timings.get("recall", 0), rank_us=timings.get("rank", 0), total_us=timings.get("total", 0)
        ),
        request_id=request_id,
        basis=result.basis,
    )


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    """Serves the Recommender rpcs, on a ``grpc.aio`` event loop, from the engine an :class:`EngineHolder` holds.

    The loop does only protocol work: a ``Recommend`` waits on the micro-batcher (whose
    thread runs the engine) and blocking calls run on ``executor``, so no engine work
    ever holds up the loop.

    Args:
        engine: the engine to serve (``recommend(RecommendQuery) -> RecommendResult``,
            optionally ``recommend_batch``); ignored when ``holder`` is given.
        holder: owns the engine and swaps bundles (``Reload``); default: a fixed one.
        batcher: gathers concurrent ``Recommend`` calls (see :func:`server.app.recommend_batcher`);
            ``None`` runs each on ``executor``.
        metrics: where stage timings and logged-event counts go.
        executor: threads for blocking work (unbatched ``Recommend``, ``LogEvents``
            commits, ``Reload``); ``None`` for the loop's default executor.
        peers: the other server processes of the port, which take queries when this
            one is busier (:mod:`server.peers`; needs ``batcher``); ``None`` for none.

    Attributes:
        engine: the serving engine. Assigning a new one swaps it for later requests;
            requests already running finish on the engine they started with.
    """

    def __init__(
        self,
        engine=None,
        *,
        holder: EngineHolder | None = None,
        batcher: MicroBatcher | None = None,
        metrics: Metrics | None = None,
        executor: Executor | None = None,
        peers: Peers | None = None,
    ) -> None:
        self.holder = holder if holder is not None else EngineHolder(engine)
        self.batcher = batcher
        self.peers = peers if batcher is not None else None
        self.metrics = metrics if metrics is not None else Metrics()
        self.executor = executor

    @property
    def engine(self):
        return self.holder.engine

    @engine.setter
    def engine(self, engine) -> None:
        self.holder.engine = engine

    async def _blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def Recommend(self, request: recommender_pb2.RecommendRequest, context: grpc.aio.ServicerContext) -> recommender_pb2.RecommendResponse:
        """Validate, run the engine (batched), convert; aborts with INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (shed) or INTERNAL."""
        try:
            query = validate(request)
        except BadQuery as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        try:
            if self.batcher is None:
                # One read, so a swap mid-request cannot mix two engines' versions and results.
                result = await self._blocking(self.engine.recommend, query)
            else:
                remaining = context.time_remaining()
                deadline = time.monotonic() + remaining if remaining is not None else None
                result = await self._batched(query, deadline)
            self.metrics.stage.labels("recall").observe(result.timings_us.get("recall", 0) / 1e6)
            self.metrics.stage.labels("rank").observe(result.timings_us.get("rank", 0) / 1e6)
            return to_response(result, request.request_id)
        except BadQuery as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except DeadlineExpired as err:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"not computed: {err}")
        except Overloaded as err:
            self.metrics.shed.inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"overloaded, not queued (retry later or elsewhere): {err}")
        except Exception:
            log.exception("Recommend failed (request_id=%r, user_id=%r)", request.request_id, request.user_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error serving request_id={request.request_id!r}; see the server log")

    async def _batched(self, query: RecommendQuery, deadline: float | None) -> RecommendResult:
        """The query's result from this process's micro-batcher, or from a peer process's when this one is busier (:mod:`server.peers`)."""
        peer = self.peers.pick(self.batcher.load) if self.peers is not None else None
        if peer is not None:
            self.metrics.forwarded.inc()
            try:
                return await self.peers.forward(peer, query, deadline)
            except PeerUnavailable:
                pass  # the peer stopped: compute it here
        return await self.batcher.submit_async(query, deadline)

    async def Reload(self, request: recommender_pb2.ReloadRequest, context: grpc.aio.ServicerContext) -> recommender_pb2.ReloadResponse:
        """Swap in the bundle ``CURRENT`` names now; FAILED_PRECONDITION with the reason when it is refused."""
        try:
            outcome = await self._blocking(self.holder.reload)
        except BundleRefused as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"bundle refused, the old one keeps serving: {err}")
        except Exception:
            log.exception("Reload failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error reloading the bundle; see the server log")
        return recommender_pb2.ReloadResponse(changed=outcome.changed, model_version=outcome.model_version, index_version=outcome.index_version)

    async def LogEvents(self, request: recommender_pb2.LogEventsRequest, context: grpc.aio.ServicerContext) -> recommender_pb2.LogEventsResponse:
        """Validate and store a batch; returns once it is durable.

        Aborts with INVALID_ARGUMENT (bad batch, nothing stored), FAILED_PRECONDITION
        (server keeps no state), UNAVAILABLE (state store unreachable) or INTERNAL.
        """
        engine = self.engine
        try:
            events = validate_events(request)
        except BadQuery as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if getattr(engine, "state", None) is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server was started without user state; LogEvents is not available")
        try:
            unknown = await self._blocking(engine.log_events, events)
        except StateUnavailable as err:
            log.warning("LogEvents: %s", err)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"user state store unavailable, the batch is not acknowledged (retry): {err}")
        except Exception:
            log.exception("LogEvents failed (%d events)", len(events))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error storing events; see the server log")
        self.metrics.events_logged.inc(len(events))
        return recommender_pb2.LogEventsResponse(accepted=len(events), unknown_items=unknown)
