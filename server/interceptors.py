"""One server interceptor for what every rpc shares: bearer-token check, request size limit, metrics, access log.

The access log is one record per rpc on the ``funnel.access`` logger with the fields
``method``, ``code``, ``ms`` and ``request_id`` (as ``extra``, so a JSON formatter
emits them as keys): DEBUG for OK, WARNING otherwise.
"""

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import Collection

import grpc

from funnel.server.metrics import Metrics

access_log = logging.getLogger("funnel.access")


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary-unary handler of a ``grpc.aio`` server.

    Args:
        metrics: where request counts and latencies go.
        token: when set, the methods in ``protected`` need metadata
            ``authorization: Bearer <token>`` (else UNAUTHENTICATED).
        protected: full method names (``/package.Service/Method``) the token guards.
        max_request_bytes: a request whose serialized size exceeds this is
            INVALID_ARGUMENT before its handler runs (0: no check).
    """

    def __init__(self, metrics: Metrics, *, token: str | None = None, protected: Collection[str] = (), max_request_bytes: int = 0) -> None:
        self.metrics = metrics
        self._expected = f"Bearer {token}".encode() if token else None
        self.protected = frozenset(protected)
        self.max_request_bytes = max_request_bytes

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        short = method.rsplit("/", 1)[-1]
        guarded = self._expected is not None and method in self.protected
        behavior = handler.unary_unary

        async def wrapped(request, context):
            started = time.perf_counter()
            self.metrics.in_progress.inc()
            try:
                if guarded and not self._authorized(context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{short} needs metadata 'authorization: Bearer <token>' with the server's token")
                if self.max_request_bytes and request.ByteSize() > self.max_request_bytes:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"request is {request.ByteSize()} bytes; this server accepts at most {self.max_request_bytes}"
                    )
                response = behavior(request, context)
                if inspect.isawaitable(response):
                    response = await response
                self._record(short, context.code() or grpc.StatusCode.OK, started, request)
                return response
            except asyncio.CancelledError:
                # The caller's deadline passed or it cancelled: the rpc ends without a handler status.
                remaining = context.time_remaining()
                gone = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
                self._record(short, gone, started, request)
                raise
            except BaseException:
                self._record(short, context.code() or grpc.StatusCode.UNKNOWN, started, request)
                raise
            finally:
                self.metrics.in_progress.dec()

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        for key, value in context.invocation_metadata():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    def _record(self, method: str, code: grpc.StatusCode, started: float, request) -> None:
        seconds = time.perf_counter() - started
        self.metrics.requests.labels(method, code.name).inc()
        self.metrics.latency.labels(method).observe(seconds)
        fields = {"method": method, "code": code.name, "ms": round(seconds * 1e3, 3), "request_id": getattr(request, "request_id", "")}
        level = logging.DEBUG if code == grpc.StatusCode.OK else logging.WARNING
        if access_log.isEnabledFor(level):
            access_log.log(level, "rpc %s %s %.3fms request_id=%s", method, code.name, fields["ms"], fields["request_id"], extra=fields)
