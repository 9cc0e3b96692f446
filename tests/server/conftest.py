"""Fixtures shared by the server tests."""

import pytest

from server.app import create_server
from server.engine import Engine


@pytest.fixture(scope="module")
def live(tiny_bundle):
    """A real server on a free port around the tiny bundle's engine: (engine, "host:port")."""
    engine = Engine.load(tiny_bundle)
    server, port = create_server("127.0.0.1:0", engine)
    server.start()
    yield engine, f"127.0.0.1:{port}"
    server.stop(None)
