"""A ``grpc.aio`` server driven from synchronous code: its event loop runs on a thread of its own.

One event loop does every request's protocol work (parsing, validation, the response),
with no thread per request: engine work goes to the micro-batcher's thread and
blocking calls (event-store commits, bundle reloads) to a small thread pool, so the loop
only waits. The wrapper keeps the synchronous server's calls (``start()``,
``stop(grace).wait()``), so callers need no event loop of their own.
"""

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc

T = TypeVar("T")


class AioServer:
    """A ``grpc.aio.Server`` on an event loop thread.

    Args:
        interceptors: ``grpc.aio.ServerInterceptor`` instances.
        options: channel arguments of the server.
        max_concurrent_rpcs: rpcs in progress beyond which gRPC refuses new ones itself
            with RESOURCE_EXHAUSTED; ``None`` for no limit.
    """

    def __init__(self, *, interceptors: Sequence[Any] = (), options: Sequence[tuple[str, Any]] = (), max_concurrent_rpcs: int | None = None):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="grpc-aio", daemon=True)
        self._thread.start()
        self._stopped = threading.Event()

        async def create() -> grpc.aio.Server:
            return grpc.aio.server(interceptors=list(interceptors), options=list(options), maximum_concurrent_rpcs=max_concurrent_rpcs)

        self.aio = self.run(create())

    def _run_loop(self) -> None:
        self.loop.run_forever()
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def call(self, fn: Callable[..., T], *args) -> T:
        """Call a plain function on the server's loop thread (the aio server is not thread-safe) and return its result."""

        async def call() -> T:
            return fn(*args)

        return self.run(call())

    def add_insecure_port(self, addr: str) -> int:
        return self.call(self.aio.add_insecure_port, addr)

    def add_secure_port(self, addr: str, credentials: grpc.ServerCredentials) -> int:
        return self.call(self.aio.add_secure_port, addr, credentials)

    def start(self) -> None:
        """Start serving; returns once the server accepts calls."""
        self.run(self.aio.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop taking calls, give running ones ``grace`` seconds (``None``: none), then stop the loop.

        Returns:
            An event set once everything stopped (``.wait()`` as on a synchronous server's stop).
        """
        if self._stopped.is_set() or self.loop.is_closed() or not self.loop.is_running():
            self._stopped.set()
            return self._stopped

        def done(_) -> None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._stopped.set()

        asyncio.run_coroutine_threadsafe(self.aio.stop(grace), self.loop).add_done_callback(done)
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` finished; ``False`` on timeout."""
        return self._stopped.wait(timeout)
