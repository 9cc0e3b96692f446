"""``funnel recommend``: call a running server's Recommend and print the ranked items.

Example:
    funnel recommend --addr localhost:50051 --user 1 -k 10 --event 2333346:buy:1511658000
    funnel recommend --addr localhost:50051 --user 1 --head-weight buy=2 --head-weight click=0.5 --why
"""

import argparse
import sys
import time
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from funnel.events.schema import BEHAVIORS
from funnel.server.query import Attended, Event, RecommendResult, Recommendation
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc

TITLE_WIDTH = 40
HEALTH_RETRY_S = 0.05


def recommend(
    *,
    addr: str,
    user_id: str,
    k: int = 10,
    recent_events: list[Event] | None = None,
    exclude_item_ids: Iterable[str] = (),
    include_seen: bool = False,
    category: str | None = None,
    request_id: str = "",
    head_weights: dict[str, float] | None = None,
    explain: bool = False,
    timeout: float = 10.0,
) -> RecommendResult:
    """Send one Recommend request.

    Args:
        addr: server ``host:port``.
        user_id: user as spelled in the behaviour log.
        k: items wanted, 1..1000.
        recent_events: behaviour since the bundle was built, oldest first.
        exclude_item_ids: items never to return.
        include_seen: let items the user already interacted with come back.
        category: only items of this category; ``None`` for no filter.
        request_id: echoed back and used in the server log.
        head_weights: weights of the ranker's heads ("click", "cart_fav", "buy") in the
            final score; heads left out keep the server's weights.
        explain: ask for each item's explanation (the behaviours that raise its score most).
        timeout: deadline in seconds.

    Returns:
        The ranked items, versions and timings (``timings_us`` keys ``recall``, ``rank``, ``total``).

    Raises:
        grpc.RpcError: the call failed (e.g. INVALID_ARGUMENT for a bad request).
    """
    request = recommender_pb2.RecommendRequest(
        user_id=user_id,
        k=k,
        recent_events=[recommender_pb2.Event(item_id=e.item_id, behavior=e.behavior, timestamp=e.timestamp) for e in recent_events or ()],
        exclude_item_ids=list(exclude_item_ids),
        include_seen=include_seen,
        request_id=request_id,
        head_weights=head_weights or {},
        explain=explain,
    )
    if category is not None:
        request.category = category
    with grpc.insecure_channel(addr) as channel:
        response = recommender_pb2_grpc.RecommenderStub(channel).Recommend(request, timeout=timeout)
    return RecommendResult(
        items=[
            Recommendation(
                r.item_id,
                r.score,
                r.recall_score,
                r.channel,
                r.title,
                r.category,
                because=tuple(Attended(a.item_id, a.behavior, a.timestamp, a.weight, a.effect) for a in r.because),
                head_scores=dict(r.head_scores),
            )
            for r in response.items
        ],
        model_version=response.model_version,
        index_version=response.index_version,
        timings_us={"recall": response.timings.recall_us, "rank": response.timings.rank_us, "total": response.timings.total_us},
        basis=response.basis or "known",
    )


BASIS_LINES = {
    "known": "user: known to the bundle (history from its log and logged events)",
    "recent_events": "cold user: not in the bundle; served from the request's recent events and logged events",
    "popularity": "cold user: no behaviour known; served by popularity",
}


def format_result(result: RecommendResult, why: bool = False) -> str:
    """Render a result as a table plus a versions/timings footer.

    Args:
        result: what :func:`recommend` returned.
        why: under each item, its per-head scores and the past behaviours that raise
            its score most (present when the request asked for explanations).

    Returns:
        Multi-line text, no trailing newline.
    """
    header = ("rank", "item_id", "title", "category", "score", "recall_score", "channel")
    rows = [
        (str(i), r.item_id, _clip(r.title), r.category, f"{r.score:.4f}", f"{r.recall_score:.4f}", r.channel)
        for i, r in enumerate(result.items, start=1)
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    numeric = {0, 4, 5}

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.rjust(w) if c in numeric else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))).rstrip()

    lines = []
    for r, row in zip(result.items, rows):
        lines.append(line(row))
        if why:
            lines.extend(_explain(r))
    lines = [line(header), *lines] if rows else ["(no items)"]
    t = result.timings_us
    lines.append(BASIS_LINES.get(result.basis, f"basis: {result.basis}"))
    lines.append(f"model {result.model_version}, index {result.index_version}")
    lines.append(f"timings: recall {t.get('recall', 0):,} us, rank {t.get('rank', 0):,} us, total {t.get('total', 0):,} us")
    return "\n".join(lines)


def _explain(r: Recommendation) -> list[str]:
    """Indented lines: per-head scores, then each explaining behaviour with its effect on the score."""
    out = []
    if r.head_scores:
        out.append("      heads: " + ", ".join(f"{name} {p:.4f}" for name, p in sorted(r.head_scores.items())))
    for a in r.because:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(a.timestamp))
        out.append(f"      because {a.behavior} {a.item_id} at {when} UTC (score +{a.effect:.4f} with it; attention {a.weight:.2f})")
    return out


def _clip(text: str) -> str:
    return text if len(text) <= TITLE_WIDTH else text[: TITLE_WIDTH - 1] + "…"


def wait_ready(addr: str, timeout: float) -> None:
    """Block until the server's health service reports SERVING.

    Args:
        addr: server ``host:port``.
        timeout: seconds to wait in total.

    Raises:
        TimeoutError: not SERVING within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while (left := deadline - time.monotonic()) > 0:
            try:
                # wait_for_ready: a server still binding is waited for, not an error.
                if stub.Check(request, timeout=left, wait_for_ready=True).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
            time.sleep(min(HEALTH_RETRY_S, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(f"{addr} not SERVING within {timeout:g}s")


def parse_event(text: str) -> Event:
    """Parse ``ITEM:BEHAVIOR:TS`` (the item id may itself contain colons).

    Args:
        text: e.g. ``2333346:buy:1511658000``.

    Returns:
        The event.

    Raises:
        argparse.ArgumentTypeError: naming the bad string and the expected form.
    """
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise argparse.ArgumentTypeError(f"{text!r} is not ITEM:BEHAVIOR:TS")
    item, behavior, ts = parts
    if behavior not in BEHAVIORS:
        raise argparse.ArgumentTypeError(f"{text!r}: behaviour {behavior!r} is not one of {', '.join(BEHAVIORS)}")
    try:
        return Event(item, behavior, int(ts))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: timestamp {ts!r} is not an integer (unix seconds)") from None


def parse_head_weight(text: str) -> tuple[str, float]:
    """Parse ``HEAD=WEIGHT``.

    Args:
        text: e.g. ``buy=2.5``.

    Returns:
        (head name, weight); the server checks the name and that the weight is >= 0.

    Raises:
        argparse.ArgumentTypeError: naming the bad string and the expected form.
    """
    head, sep, weight = text.partition("=")
    if not sep or not head:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEAD=WEIGHT")
    try:
        return head, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: weight {weight!r} is not a number") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--addr", required=True, metavar="HOST:PORT", help="server address, e.g. localhost:50051")
    parser.add_argument("--user", required=True, help="user id as spelled in the behaviour log; unknown users get cold-start results")
    parser.add_argument("-k", type=int, default=10, help="items to return, 1..1000 (default: 10)")
    parser.add_argument(
        "--event",
        dest="events",
        type=parse_event,
        action="extend",
        nargs="+",
        default=[],
        metavar="ITEM:BEHAVIOR:TS",
        help=f"behaviour not in the served log yet, oldest first; BEHAVIOR is one of {', '.join(BEHAVIORS)}, TS unix seconds (repeatable)",
    )
    parser.add_argument("--exclude", action="extend", nargs="+", default=[], metavar="ITEM", help="item ids never to return (repeatable)")
    parser.add_argument("--category", help="only items of this category")
    parser.add_argument("--include-seen", action="store_true", help="let items the user already interacted with come back")
    parser.add_argument("--request-id", default="", help="id echoed back and logged by the server")
    parser.add_argument(
        "--head-weight", dest="head_weights", type=parse_head_weight, action="append", default=[], metavar="HEAD=W",
        help="weight of a ranker head (click, cart_fav, buy) in the final score for this request; heads not given keep the server's weights (repeatable)",
    )
    parser.add_argument(
        "--why", action="store_true",
        help="under each item, print its per-head scores and the past behaviours that raise its score most (by how much the score drops without "
        "each; asks the server for explanations, a second ranking pass)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds (default: 10)")


def run(args: argparse.Namespace) -> int:
    try:
        result = recommend(
            addr=args.addr,
            user_id=args.user,
            k=args.k,
            recent_events=args.events,
            exclude_item_ids=args.exclude,
            include_seen=args.include_seen,
            category=args.category,
            request_id=args.request_id,
            head_weights=dict(args.head_weights),
            explain=args.why,
            timeout=args.timeout,
        )
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_result(result, why=args.why))
    return 0
