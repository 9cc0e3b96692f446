"""gRPC server assembly: the Recommender servicer plus standard health checking and reflection."""

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.rpc import recommender_pb2_grpc
from server.service import SERVICE_NAME, RecommenderServicer

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0


def create_server(addr: str, engine, *, max_workers: int = 8) -> tuple[grpc.Server, int]:
    """Build a server for ``engine`` bound to ``addr``; the caller starts and stops it.

    Args:
        addr: ``host:port`` to bind; port 0 picks a free one.
        engine: object with ``recommend(RecommendQuery) -> RecommendResult``.
        max_workers: request threads.

    Returns:
        The unstarted server and the port it is bound to.

    Raises:
        RuntimeError: ``addr`` could not be bound.
    """
    server, port, _ = _build(addr, engine, max_workers)
    return server, port


def _build(addr: str, engine, max_workers: int) -> tuple[grpc.Server, int, health.HealthServicer]:
    """``create_server``, also returning the health servicer so shutdown can report NOT_SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="recommend"))
    recommender_pb2_grpc.add_RecommenderServicer_to_server(RecommenderServicer(engine), server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(addr)
    return server, port, health_servicer


def serve(bundle_dir: str, *, host: str = "0.0.0.0", port: int = 50051, max_workers: int = 8) -> None:
    """Serve a bundle until SIGINT or SIGTERM, then drain in-flight requests and return.

    Args:
        bundle_dir: bundle root (with CURRENT) or a version directory.
        host: address to bind.
        port: port to bind; 0 picks a free one.
        max_workers: request threads.
    """
    from server.engine import Engine

    engine = Engine.load(bundle_dir)
    server, bound, health_servicer = _build(f"{host}:{port}", engine, max_workers)
    server.start()
    log.info("serving %s (model %s, index %s) on %s:%d", SERVICE_NAME, engine.model_version, engine.index_version, host, bound)

    stop_requested = threading.Event()
    # The handler only flags; shutdown runs on the main thread, outside signal context.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())
    stop_requested.wait()
    log.info("shutting down: draining in-flight requests for up to %.0fs", SHUTDOWN_GRACE_S)
    # Health pollers (load balancers) stop routing here while in-flight requests finish.
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=SHUTDOWN_GRACE_S).wait()
    log.info("server stopped")
