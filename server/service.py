"""The ``funnel.v1.Recommender`` servicer: protocol checks and protobuf <-> dataclass conversion.

The engine only ever sees :class:`server.query.RecommendQuery`; everything that can be
rejected from the request alone is rejected here, before the engine runs.
"""

import logging

import grpc

from events.schema import BEHAVIORS
from server.query import BadQuery, Event, RecommendQuery, RecommendResult
from server.rpc import recommender_pb2, recommender_pb2_grpc

log = logging.getLogger(__name__)

MAX_K = 1000
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
    for i, event in enumerate(request.recent_events):
        if not event.item_id:
            raise BadQuery(f"recent_events[{i}].item_id is empty")
        if event.behavior not in BEHAVIORS:
            raise BadQuery(f"recent_events[{i}].behavior {event.behavior!r} is not one of {', '.join(BEHAVIORS)}")
    return RecommendQuery(
        user_id=request.user_id,
        k=request.k,
        recent_events=tuple(Event(e.item_id, e.behavior, e.timestamp) for e in request.recent_events),
        exclude_item_ids=tuple(request.exclude_item_ids),
        include_seen=request.include_seen,
        category=request.category if request.HasField("category") else None,
        request_id=request.request_id,
    )


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
                item_id=r.item_id, score=r.score, recall_score=r.recall_score, channel=r.channel, title=r.title, category=r.category
            )
            for r in result.items
        ],
        model_version=result.model_version,
        index_version=result.index_version,
        timings=recommender_pb2.StageTimings(
            recall_us=timings.get("recall", 0), rank_us=timings.get("rank", 0), total_us=timings.get("total", 0)
        ),
        request_id=request_id,
    )


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    """Serves ``Recommend`` from an engine with ``recommend(RecommendQuery) -> RecommendResult``.

    Attributes:
        engine: the serving engine. Assigning a new one swaps it for later requests;
            requests already running finish on the engine they started with.
    """

    def __init__(self, engine) -> None:
        self.engine = engine

    def Recommend(self, request: recommender_pb2.RecommendRequest, context: grpc.ServicerContext) -> recommender_pb2.RecommendResponse:
        """Validate, run the engine, convert; aborts with INVALID_ARGUMENT or INTERNAL."""
        # One read, so a swap mid-request cannot mix two engines' versions and results.
        engine = self.engine
        try:
            return to_response(engine.recommend(validate(request)), request.request_id)
        except BadQuery as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception:
            log.exception("Recommend failed (request_id=%r, user_id=%r)", request.request_id, request.user_id)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error serving request_id={request.request_id!r}; see the server log")
