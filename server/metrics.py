"""Prometheus metrics of one server: requests, per-stage latency, batch sizes, bundle version, events logged.

Each :class:`Metrics` owns its own registry, so several servers in one process (tests)
never collide, and :meth:`Metrics.serve` exposes exactly that registry over HTTP.
"""

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import generate_latest

# Sub-millisecond to seconds: serving latencies sit in the low milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's metric families.

    Attributes:
        requests: counter of finished rpcs by ``method`` (short name) and ``code`` (status name).
        latency: histogram of whole-rpc seconds by ``method``.
        stage: histogram of seconds by ``stage``: ``queue`` (waiting for a batch),
            ``batch`` (one batch's engine time), ``recall`` and ``rank`` (engine stages).
        batch_size: histogram of requests per batch.
        expired: counter of requests dropped because their deadline passed before their batch.
        shed: counter of requests refused on arrival by admission control (RESOURCE_EXHAUSTED).
        bundle: gauge set to 1 for the served ``model_version``/``index_version`` pair (0 for earlier ones).
        reloads: counter of bundle loads by ``outcome`` (``swapped``, ``refused``, and
            ``fallback`` when start-up served an older version than ``CURRENT`` names).
        events_logged: counter of behaviour events accepted by ``LogEvents``.
        in_progress: gauge of rpcs inside the server's handlers now, to compare with
            ``--max-concurrent-rpcs`` (past it gRPC refuses calls before they are counted anywhere).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("funnel_requests", "Finished rpcs by method and status code.", ["method", "code"], registry=r)
        self.latency = Histogram("funnel_request_seconds", "Whole-rpc latency by method.", ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("funnel_stage_seconds", "Latency of one serving stage.", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("funnel_batch_size", "Recommend requests per micro-batch.", buckets=BATCH_BUCKETS, registry=r)
        self.expired = Counter("funnel_deadline_expired", "Requests not computed because their deadline had passed.", registry=r)
        self.forwarded = Counter("funnel_requests_forwarded", "Recommend queries sent to another server process of the port to compute (server.peers).", registry=r)
        self.shed = Counter("funnel_requests_shed", "Requests refused on arrival because the queued work would overrun their deadline.", registry=r)
        self.bundle = Gauge("funnel_bundle_info", "1 for the bundle being served.", ["model_version", "index_version"], registry=r)
        self.reloads = Counter("funnel_bundle_reloads", "Bundle loads by outcome.", ["outcome"], registry=r)
        self.events_logged = Counter("funnel_events_logged", "Behaviour events accepted by LogEvents.", registry=r)
        self.in_progress = Gauge("funnel_rpcs_in_progress", "Rpcs inside the server's handlers now (gRPC refuses those past --max-concurrent-rpcs).", registry=r)
        self._bundle_lock = threading.Lock()
        self._served: tuple[str, str] | None = None

    def set_bundle(self, model_version: str, index_version: str) -> None:
        """Mark the bundle now served (the previous one's series drops to 0)."""
        with self._bundle_lock:
            if self._served is not None:
                self.bundle.labels(*self._served).set(0)
            self._served = (model_version, index_version)
            self.bundle.labels(model_version, index_version).set(1)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Expose ``/metrics`` over HTTP on a daemon thread.

        Returns:
            The HTTP server (``shutdown()`` stops it); its ``server_port`` is the bound port.
        """
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return server

    def text(self) -> str:
        """The exposition text, as a scrape would see it."""
        return generate_latest(self.registry).decode()
