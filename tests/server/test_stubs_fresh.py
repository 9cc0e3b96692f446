"""The checked-in stubs in server/rpc/ match what funnel.tools.gen_proto generates from proto/."""

import os
import sys

import pytest

from funnel.tools.gen_proto import generate

# The checkout's folders, not the installed package's: a wheel ships neither proto/ nor a place to regenerate into.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_checked_in_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (pip install -e '.[dev]'); cannot regenerate stubs")
    for fresh in generate(str(tmp_path), proto_root=os.path.join(REPO_ROOT, "proto")):
        name = os.path.basename(fresh)
        checked_in = os.path.join(REPO_ROOT, "server", "rpc", name)
        assert os.path.exists(checked_in), f"server/rpc/{name} is missing; run python -m funnel.tools.gen_proto"
        with open(fresh, "rb") as a, open(checked_in, "rb") as b:
            assert a.read() == b.read(), f"server/rpc/{name} is stale; run python -m funnel.tools.gen_proto"


def test_stubs_import_through_server_rpc():
    from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc  # noqa: F401

    assert "funnel.v1" not in sys.modules, "a stub imported its pb2 as funnel.v1, the proto package"
    assert recommender_pb2.RecommendRequest.__module__ == "funnel.server.rpc.recommender_pb2"
    assert recommender_pb2.DESCRIPTOR.name == "funnel/v1/recommender.proto"
