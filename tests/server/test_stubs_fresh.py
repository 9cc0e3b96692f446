"""The checked-in stubs in server/rpc/ match what tools.gen_proto generates from proto/."""

import os
import sys

import pytest

from tools.gen_proto import DEFAULT_OUT, generate


def test_checked_in_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (pip install -e '.[dev]'); cannot regenerate stubs")
    for fresh in generate(str(tmp_path)):
        name = os.path.basename(fresh)
        checked_in = os.path.join(DEFAULT_OUT, name)
        assert os.path.exists(checked_in), f"server/rpc/{name} is missing; run python -m tools.gen_proto"
        with open(fresh, "rb") as a, open(checked_in, "rb") as b:
            assert a.read() == b.read(), f"server/rpc/{name} is stale; run python -m tools.gen_proto"


def test_stubs_import_through_server_rpc():
    from server.rpc import recommender_pb2, recommender_pb2_grpc  # noqa: F401

    assert "funnel" not in sys.modules, "a stub imported its pb2 as top-level funnel.v1"
    assert recommender_pb2.RecommendRequest.__module__ == "server.rpc.recommender_pb2"
    assert recommender_pb2.DESCRIPTOR.name == "funnel/v1/recommender.proto"
