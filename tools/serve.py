"""``funnel serve``: serve a bundle over gRPC until SIGINT/SIGTERM (graceful shutdown)."""

import argparse
import os
import sys

from funnel.events.eventlog import EventStoreError
from funnel.recall.runtime import RUNTIMES
from funnel.server.app import TOKEN_ENV, BindError, ServerOptions, open_without_token
from funnel.server.state import MAX_EVENTS_PER_USER, StateUnavailable
from funnel.tools.cli import add_candidates_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle-root", "--bundle", dest="bundle", required=True,
        help="bundle root: serves the version CURRENT names and swaps to a new one when CURRENT changes or on the Reload rpc "
        "(a version directory is served as is)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address to bind; another than this machine's (e.g. 0.0.0.0) needs --token or FUNNEL_TOKEN, or --insecure (default: 127.0.0.1)",
    )
    parser.add_argument(
        "--insecure", action="store_true",
        help="serve on a non-loopback --host without a token: anyone who reaches the port can call LogEvents and Reload (default: refused)",
    )
    parser.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one (default: 50051)")
    parser.add_argument("--workers", type=int, default=ServerOptions.max_workers, help=f"threads for blocking work beside the event loop: LogEvents commits, reloads, Recommend with --max-batch 1 (default: {ServerOptions.max_workers})")
    parser.add_argument("--max-batch", type=int, default=ServerOptions.max_batch, help=f"most Recommend requests computed as one batch; 1 turns batching off (default: {ServerOptions.max_batch})")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=ServerOptions.batch_wait_ms,
        help="how long a batch keeps gathering requests after its first one; 0 takes only those already waiting, which still "
        f"batches under load (requests queue while a batch computes) and adds no wait to a lone request (default: {ServerOptions.batch_wait_ms})",
    )
    parser.add_argument(
        "--max-concurrent-rpcs", type=int, default=ServerOptions.max_concurrent_rpcs,
        help="rpcs in progress per server process beyond which gRPC itself refuses new ones at once with RESOURCE_EXHAUSTED, before "
        "the interceptor and the servicer run, so heavy overload is refused instead of queueing for a busy event loop (these "
        f"refusals are not counted in funnel_requests); 0 for no limit (default: {ServerOptions.max_concurrent_rpcs})",
    )
    add_candidates_argument(parser, "fewer candidates rank faster; 'funnel evaluate --candidates' measures what they cost in quality")
    parser.add_argument(
        "--processes", type=int, default=None,
        help="server processes sharing --port (SO_REUSEPORT), each with its own engine, so every core computes; they see each "
        "other's logged events through the shared event log (or Redis); process i serves metrics on --metrics-port + i "
        "(default: one per core; one with --port 0, which processes cannot share)",
    )
    parser.add_argument(
        "--pin-cores", action=argparse.BooleanOptionalAction, default=True,
        help="with several --processes, pin each to cores of its own (the cores split between them; one each with a process per core), "
        "so its threads keep their core's caches instead of migrating (lower latency under load); --no-pin-cores leaves placement to the scheduler, for a machine whose cores other busy services share (default: pinned)",
    )
    parser.add_argument(
        "--share-work", action=argparse.BooleanOptionalAction, default=True,
        help="with several --processes, a process whose engine has queries queued or computing hands a Recommend to a less busy one "
        "over a local socket, so the engines share the work even when the client's connections do not spread evenly over the "
        "processes (one connection reaches one process); --no-share-work keeps each query in the process that took its connection (default: shared)",
    )
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default="onnx",
        help="model runtime: ONNX Runtime over the bundle's exports, one thread, no torch work per request (onnx, default), "
        "or the frozen PyTorch models (torch)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: half the cores this process may use, at least 1: the other half runs the gRPC threads)")
    parser.add_argument("--watch-interval", type=float, default=2.0, help="seconds between checks of CURRENT for a new bundle; 0 only reloads on the Reload rpc (default: 2)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    parser.add_argument(
        "--max-message-bytes", type=int, default=ServerOptions.max_message_bytes,
        help=f"largest request accepted; bigger ones get INVALID_ARGUMENT (default: {ServerOptions.max_message_bytes})",
    )
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV),
        help=f"bearer token required for LogEvents and Reload ('authorization: Bearer TOKEN'); prefer the {TOKEN_ENV} variable, "
        f"which is the default, so the token stays out of process listings (default: none required)",
    )
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain; with --tls-key the server speaks TLS only")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--state", default="memory",
        help="where users' logged behaviour (LogEvents) lives: 'memory' (this process, made durable by --event-log) "
        "or redis://HOST:PORT[/DB] (shared by replicas; an event is stored once Redis acknowledged it) (default: memory)",
    )
    parser.add_argument(
        "--event-log", default=None, metavar="PATH",
        help="durable event store (SQLite, WAL, fsync per LogEvents call): written before LogEvents answers, replayed on "
        "start with --state memory and shared by the server processes, folded into training by 'funnel train --fold-events PATH' "
        "(default: BUNDLE/events.db with --state memory, none with Redis)",
    )
    parser.add_argument("--no-event-log", action="store_true", help="keep logged events only in the state (lost on restart with --state memory)")
    parser.add_argument(
        "--max-user-events", type=int, default=MAX_EVENTS_PER_USER,
        help=f"most recent logged events kept per user in the state; the event log keeps all (default: {MAX_EVENTS_PER_USER})",
    )


def run(args: argparse.Namespace) -> int:
    from funnel.server.app import serve
    from funnel.server.processes import ProcessesError, serve_processes

    processes = args.processes if args.processes is not None else (len(os.sched_getaffinity(0)) if args.port else 1)
    event_log = args.event_log
    if args.no_event_log:
        event_log = None
    elif event_log is None and args.state == "memory":
        event_log = os.path.join(args.bundle, "events.db")
    try:
        options = ServerOptions(
            max_workers=args.workers, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_message_bytes=args.max_message_bytes,
            token=args.token or None, tls_cert=args.tls_cert, tls_key=args.tls_key, max_concurrent_rpcs=args.max_concurrent_rpcs,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        refusal = open_without_token(args.host, options)
        if refusal and not args.insecure:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
        if refusal:
            print(f"warning: --insecure: serving {args.host} without a token; LogEvents and Reload are open to anyone who reaches the port", file=sys.stderr)
        kwargs = dict(
            bundle_dir=args.bundle, host=args.host, port=args.port, options=options, metrics_port=args.metrics_port,
            watch_interval_s=args.watch_interval, threads=args.threads, state=args.state, event_log=event_log, max_events_per_user=args.max_user_events,
            candidates=args.candidates, runtime=args.runtime,
        )
        if processes < 1:
            raise ProcessesError(f"--processes must be at least 1, got {processes}")
        if processes > 1:
            return serve_processes(processes, kwargs, pin_cores=args.pin_cores, share_work=args.share_work)
        serve(**kwargs)
    except (StateUnavailable, EventStoreError, ProcessesError, BindError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
