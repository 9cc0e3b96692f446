"""Fixtures shared by the server tests.

``redis_url`` is a real ``redis-server`` on a free loopback port. The Debian package
``redis-server`` provides the binary; ``.ci/run`` installs it and sets
``FUNNEL_REQUIRE_REDIS=1``, which turns a missing binary into a failure instead of a skip.
"""

import os
import shutil
import socket
import subprocess
import time

import pytest

from funnel.server.app import create_server
from funnel.server.engine import Engine
from funnel.server.state import RedisState, StateUnavailable

REDIS_START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (free when asked)."""
    return free_port()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server not installed (Debian: apt-get install redis-server; tools/setup.sh does it)"
        if os.environ.get("FUNNEL_REQUIRE_REDIS"):
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("redis")
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while True:
        try:
            RedisState(url).close()
            break
        except StateUnavailable:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server on port {port} did not start (exit code {proc.poll()})")
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def live(tiny_bundle):
    """A real server on a free port around the tiny bundle's engine: (engine, "host:port")."""
    engine = Engine.load(tiny_bundle)
    server, port = create_server("127.0.0.1:0", engine)
    server.start()
    yield engine, f"127.0.0.1:{port}"
    server.stop(None)
