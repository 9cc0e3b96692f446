"""gRPC server assembly: a ``grpc.aio`` server (:mod:`server.aio`) with the Recommender servicer
behind one interceptor (token, size limit, metrics, access log), a micro-batcher, an engine holder
that follows the bundle root, health checking and reflection; :func:`serve` runs it all until a signal."""

import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from funnel.server.aio import AioServer
from funnel.server.batching import BatchStats, MicroBatcher
from funnel.server.holder import EngineHolder
from funnel.server.interceptors import ServerInterceptor
from funnel.server.metrics import Metrics
from funnel.server.peers import Peers
from funnel.server.rpc import recommender_pb2_grpc
from funnel.server.service import SERVICE_NAME, RecommenderServicer
from funnel.server.state import MAX_EVENTS_PER_USER

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
# Requests past max_message_bytes get INVALID_ARGUMENT with their size; the transport
# refuses (RESOURCE_EXHAUSTED) only far beyond, so a slightly big request gets a clear message.
TRANSPORT_SLACK = 4
TOKEN_ENV = "FUNNEL_TOKEN"


@dataclass
class ServerOptions:
    """How a server runs; every field has a working default.

    Attributes:
        max_workers: threads for blocking work beside the event loop: LogEvents commits
            (concurrent ones share one fsync), reloads, and Recommend when batching is off.
        max_batch: most Recommend requests per micro-batch (1 turns batching off).
        batch_wait_ms: how long a batch keeps gathering after its first request; 0 takes
            only the requests already waiting.
        max_message_bytes: largest request accepted (INVALID_ARGUMENT beyond).
        token: bearer token required for LogEvents and Reload; ``None`` for none.
        tls_cert, tls_key: PEM files; both set serves TLS instead of plaintext.
        reuse_port: bind with ``SO_REUSEPORT``, so several server processes share the
            port (:mod:`server.processes`); off, a second server on a taken port fails
            to start instead of silently taking part of the traffic.
        max_concurrent_rpcs: rpcs in progress (of every method) beyond which the server
            refuses new ones at once with RESOURCE_EXHAUSTED, in gRPC itself, before the
            interceptor and the servicer run (so the metrics do not count them); 0 for no
            limit. Admission control (:mod:`server.batching`) refuses what the queue could
            not finish in time, but only once a request reaches it: under heavy overload
            the event loop falls behind, and requests would wait for it before being
            refused. Health checks count too. The default, 64, is two full batches at the
            default ``max_batch``.
    """

    max_workers: int = 32
    max_batch: int = 32
    batch_wait_ms: float = 0.0
    max_message_bytes: int = 4 * 1024 * 1024
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    reuse_port: bool = False
    max_concurrent_rpcs: int = 64

    def __post_init__(self):
        if self.max_concurrent_rpcs < 0:
            raise ValueError(f"max_concurrent_rpcs must be >= 0 (0: no limit), got {self.max_concurrent_rpcs}")


class BindError(RuntimeError):
    """The server's address cannot be bound (taken, or not an address of this machine)."""


PROTECTED = tuple(f"/{SERVICE_NAME}/{m}" for m in ("LogEvents", "Reload"))


@dataclass
class Server:
    """A built server and the parts that stop with it.

    Attributes:
        server: the gRPC server (unstarted when returned by :func:`build_server`); an
            :class:`server.aio.AioServer`, with a synchronous server's ``start()`` and ``stop(grace).wait()``.
        port: the bound port.
        holder: the engine holder (``holder.reload()``, ``holder.engine``).
        servicer: the Recommender servicer.
        health: the health servicer (NOT_SERVING on shutdown).
        metrics: the server's metrics.
        batcher: the micro-batcher, or ``None`` when batching is off.
        executor: the threads for blocking work (:attr:`ServerOptions.max_workers`).
    """

    server: AioServer
    port: int
    holder: EngineHolder
    servicer: RecommenderServicer
    health: health.aio.HealthServicer
    metrics: Metrics
    batcher: MicroBatcher | None
    executor: futures.ThreadPoolExecutor

    def stop(self, grace: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish for ``grace`` seconds, then stop the batcher."""
        if not self.server.loop.is_closed() and self.server.loop.is_running():
            self.server.run(self.health.enter_graceful_shutdown())
        self.server.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.close()
        self.executor.shutdown(wait=False)


def create_server(addr: str, engine, *, max_workers: int = 8) -> tuple[AioServer, int]:
    """Build a server for ``engine`` bound to ``addr``; the caller starts and stops it.

    Args:
        addr: ``host:port`` to bind; port 0 picks a free one.
        engine: object with ``recommend(RecommendQuery) -> RecommendResult``.
        max_workers: threads for blocking work (see :class:`ServerOptions`).

    Returns:
        The unstarted server and the port it is bound to.

    Raises:
        BindError: ``addr`` could not be bound.
    """
    built = build_server(addr, holder=EngineHolder(engine), options=ServerOptions(max_workers=max_workers))
    return built.server, built.port


def build_server(addr: str, *, holder: EngineHolder, options: ServerOptions | None = None, metrics: Metrics | None = None, peers: Peers | None = None) -> Server:
    """Assemble a server around ``holder`` bound to ``addr`` (not started).

    Args:
        addr: ``host:port`` to bind; port 0 picks a free one.
        holder: owns the engine; Recommend batches read ``holder.engine``.
        options: see :class:`ServerOptions`.
        metrics: where the server's metrics go (a new set when omitted); the holder's
            swaps and refusals are counted there too.
        peers: the other server processes of the port (:mod:`server.peers`): they get
            Recommend queries when this process is busier, and this one computes theirs;
            ``None`` for none (needs batching).

    Raises:
        BindError: ``addr`` could not be bound.
        OSError: a TLS file cannot be read.
    """
    options = options or ServerOptions()
    metrics = metrics or Metrics()
    metrics.set_bundle(holder.engine.model_version, holder.engine.index_version)

    def swapped(engine) -> None:
        metrics.reloads.labels("swapped").inc()
        metrics.set_bundle(engine.model_version, engine.index_version)

    holder.on_swap = swapped
    holder.on_refuse = lambda reason: metrics.reloads.labels("refused").inc()
    if holder.fallback_from is not None:
        metrics.reloads.labels("fallback").inc()
    # The threads that run the engine take this thread's OpenMP limit (configure_threads).
    settings = thread_settings()
    batcher = (
        recommend_batcher(
            holder, metrics, max_batch=options.max_batch, max_wait_s=options.batch_wait_ms / 1e3, initializer=settings, on_load=peers.publish if peers else None
        )
        if options.max_batch > 1
        else None
    )
    if batcher is not None and peers is not None:
        peers.start(batcher)
    interceptor = ServerInterceptor(metrics, token=options.token, protected=PROTECTED, max_request_bytes=options.max_message_bytes)
    transport_limit = options.max_message_bytes * TRANSPORT_SLACK
    server = AioServer(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", transport_limit),
            ("grpc.max_send_message_length", transport_limit),
            ("grpc.so_reuseport", int(options.reuse_port)),
        ],
        max_concurrent_rpcs=options.max_concurrent_rpcs or None,
    )
    executor = futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="rpc-blocking", initializer=settings)
    servicer = RecommenderServicer(holder=holder, batcher=batcher, metrics=metrics, executor=executor, peers=peers)
    health_servicer = health.aio.HealthServicer()

    async def register() -> None:
        recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, server.aio)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server.aio)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server.aio)

    server.run(register())
    credentials = None
    if options.tls_cert or options.tls_key:
        if not (options.tls_cert and options.tls_key):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        with open(options.tls_key, "rb") as key, open(options.tls_cert, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
    try:
        port = server.add_secure_port(addr, credentials) if credentials else server.add_insecure_port(addr)
    except RuntimeError as err:
        server.stop(None)
        raise BindError(f"cannot bind {addr}: is another server listening there? ({err})") from err
    return Server(server, port, holder, servicer, health_servicer, metrics, batcher, executor)


def recommend_batcher(
    holder: EngineHolder,
    metrics: Metrics,
    *,
    max_batch: int,
    max_wait_s: float,
    initializer: Callable[[], None] | None = None,
    on_load: Callable[[int], None] | None = None,
) -> MicroBatcher:
    """A micro-batcher that runs each batch of queries on the engine held at that moment.

    One engine per batch: a swap never splits a batch, and a batch already running
    finishes on the engine it started with. ``initializer`` runs first on its thread
    (:func:`thread_settings`); ``on_load`` hears every change of its load (:class:`server.batching.MicroBatcher`).
    """

    def run(queries: list) -> list:
        engine = holder.engine
        batch = getattr(engine, "recommend_batch", None)
        return batch(queries) if batch is not None else [_one(engine, q) for q in queries]

    def observe(stats: BatchStats) -> None:
        if stats.size:
            metrics.batch_size.observe(stats.size)
            metrics.stage.labels("batch").observe(stats.run_s)
        for wait in stats.waits_s:
            metrics.stage.labels("queue").observe(wait)
        if stats.expired:
            metrics.expired.inc(stats.expired)

    return MicroBatcher(run, max_batch=max_batch, max_wait_s=max_wait_s, on_batch=observe, initializer=initializer, on_load=on_load)


def _one(engine, query):
    """An engine without a batch path, one query at a time; an error is returned for its caller alone."""
    try:
        return engine.recommend(query)
    except Exception as err:  # noqa: BLE001 - handed to this query's caller by the batcher
        return err


def configure_threads(threads: int | None = None) -> int:
    """Size torch's and faiss's thread pools so they do not oversubscribe the cores.

    One batch computes at a time while the gRPC threads (de)serialize beside it, so
    the math gets half the cores this process may use (at least one). Per-batch
    tensors are small: on 2 busy cores, 2 intra-op threads made a batch about 8x
    slower than 1 (OpenMP workers spinning against the request threads).

    Args:
        threads: the count to use instead of half the cores.

    Returns:
        The thread count used.
    """
    import faiss
    import torch

    n = threads or max(1, len(os.sched_getaffinity(0)) // 2)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already fixed once torch ran parallel work; intra-op threads are what matters
    faiss.omp_set_num_threads(n)
    return n


def thread_settings() -> Callable[[], None]:
    """The calling thread's OpenMP thread count, as a function that gives it to the thread that calls it.

    OpenMP keeps the count per thread: :func:`configure_threads` on the main thread
    leaves every thread started afterwards at the default of one per core. faiss then
    searches a batch of queries on the batcher's thread with a second OpenMP worker,
    and that worker spins between batches: under load it took as much CPU as the
    engine itself. Threads that run the engine call this first.
    """
    import faiss

    n = faiss.omp_get_max_threads()
    return lambda: faiss.omp_set_num_threads(n)


def wait_for_stop(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> int:
    """Block the main thread until one of ``signals`` arrives; returns its number.

    The handlers do nothing: a handler that set a ``threading.Event`` deadlocked when a
    second signal came while the first handler held the event's lock (a SIGTERM from
    ``pkill`` and the same one relayed by the ``--processes`` parent: the server kept the
    port and never stopped). The signal reaches this thread through the byte Python's own
    C-level handler writes to the wakeup socket, which takes no lock. The do-nothing
    handlers stay: a repeated signal must not cut short the drain that follows.

    Args:
        signals: the signals that ask to stop.

    Returns:
        The signal that arrived first.
    """
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    for signum in signals:
        signal.signal(signum, lambda *_: None)
    try:
        while True:
            received = reader.recv(1)[0]
            if received in signals:
                return received
    finally:
        signal.set_wakeup_fd(previous_fd)
        reader.close()
        writer.close()


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127.0.0.0/8, ``::1``): nobody else can connect."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def open_without_token(host: str, options: "ServerOptions") -> str | None:
    """Why serving on ``host`` with ``options`` is open to the network, or ``None`` when it is not.

    The check ``serve --insecure`` overrides (Redis's protected mode is the model): a
    non-loopback address with no token lets anyone who reaches the port log events
    into users' histories and reload bundles.
    """
    if is_loopback(host) or options.token:
        return None
    return (
        f"refusing to serve on {host} without a token: anyone who can reach the port could call LogEvents (writing into "
        f"users' histories) and Reload. Set {TOKEN_ENV} (or --token), bind 127.0.0.1, or pass --insecure to serve openly anyway"
    )


def serve(
    bundle_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    options: ServerOptions | None = None,
    metrics_port: int | None = None,
    watch_interval_s: float = 2.0,
    threads: int | None = None,
    state: str = "memory",
    event_log: str | None = None,
    max_events_per_user: int = MAX_EVENTS_PER_USER,
    candidates: dict[str, int] | None = None,
    runtime: str = "onnx",
    peers: Peers | None = None,
) -> None:
    """Serve a bundle until SIGINT or SIGTERM, then drain in-flight requests and return.

    With a bundle root, the bundle ``CURRENT`` names is served and swapped for a new
    one when ``CURRENT`` changes (polled) or on the ``Reload`` rpc.

    Args:
        bundle_dir: bundle root (with CURRENT) or a version directory.
        host: address to bind (this machine only by default; see :func:`open_without_token`
            for what the command line requires to bind others).
        port: port to bind; 0 picks a free one.
        options: threads, batching, limits, token, TLS (see :class:`ServerOptions`).
        metrics_port: serve Prometheus ``/metrics`` on this port; ``None`` for none.
        watch_interval_s: how often ``CURRENT`` is polled; 0 turns polling off.
        threads: torch/faiss threads; default half the cores this process may use (see :func:`configure_threads`).
        state: where users' logged behaviour lives: ``memory`` or ``redis://HOST:PORT``
            (shared by replicas); see :func:`server.state.open_state`.
        event_log: durable event store (SQLite) that ``LogEvents`` commits to before
            answering, replayed on start in ``memory`` mode; ``None`` for none.
        max_events_per_user: most recent events per user kept in the state.
        candidates: per-channel candidate counts replacing those of every bundle served
            (:meth:`recall.retriever.RecallConfig.parse_counts`); ``None`` keeps each bundle's.
        runtime: ``onnx`` or ``torch``, for every bundle served (:class:`server.engine.Engine`).
        peers: the other server processes of this port, sharing Recommend work
            (:mod:`server.peers`; :mod:`server.processes` passes them); ``None`` for none.
    """
    from funnel.server.engine import Engine
    from funnel.server.state import open_state

    options = options or ServerOptions()
    n_threads = configure_threads(threads)
    metrics = Metrics()
    user_state = open_state(state, event_log=event_log, max_events_per_user=max_events_per_user)
    # Every engine, the first and each swapped-in one, shares the same user state.
    holder = EngineHolder.open(bundle_dir, lambda path: Engine.load(path, user_state, candidates, runtime))
    built = build_server(f"{host}:{port}", holder=holder, options=options, metrics=metrics, peers=peers)
    built.server.start()
    engine = holder.engine
    log.info(
        "serving %s (model %s, index %s) on %s:%d%s; candidates %s; batches of up to %d within %.1f ms; %d compute threads; pid %d",
        SERVICE_NAME, engine.model_version, engine.index_version, host, built.port, " with TLS" if options.tls_cert else "",
        engine.pipeline.retriever.config.to_dict(), options.max_batch, options.batch_wait_ms, n_threads, os.getpid(),
    )
    if watch_interval_s > 0:
        holder.start_watching(watch_interval_s)
    http = None
    if metrics_port is not None:
        http = metrics.serve(metrics_port, host)
        log.info("metrics on http://%s:%d/metrics", host, http.server_port)

    wait_for_stop()
    log.info("shutting down: draining in-flight requests for up to %.0fs", SHUTDOWN_GRACE_S)
    holder.stop_watching()
    # Health pollers (load balancers) stop routing here while in-flight requests finish.
    built.stop(SHUTDOWN_GRACE_S)
    if peers is not None:
        peers.close()
    if http is not None:
        http.shutdown()
    user_state.close()
    log.info("server stopped")
