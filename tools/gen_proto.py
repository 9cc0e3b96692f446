"""``python -m funnel.tools.gen_proto``: regenerate the gRPC stubs in ``server/rpc/`` from ``proto/``.

protoc names generated modules after the ``.proto`` path (``funnel.v1.recommender_pb2``),
but ``proto/`` must not become an importable package (proto-plus owns the name ``proto``)
and the stubs live in ``funnel.server.rpc``. The ``.proto`` keeps its canonical path, so the
descriptor served by reflection is ``funnel/v1/recommender.proto``; only the Python
module references protoc writes are moved to ``funnel.server.rpc``.
"""

import os
import sys
import tempfile
from importlib import resources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_ROOT = os.path.join(REPO_ROOT, "proto")
PROTO_DIR = "funnel/v1"
PROTO_FILES = ("recommender.proto",)
TARGET_PACKAGE = "funnel.server.rpc"
DEFAULT_OUT = os.path.join(REPO_ROOT, "server", "rpc")


def _module_rewrites(stem: str) -> list[tuple[str, str]]:
    """Python module references protoc derives from the .proto path, and their ``funnel.server.rpc`` form.

    Service and method names (``/funnel.v1.Recommender/Recommend``) are wire names and are
    deliberately not among them.
    """
    source_package = PROTO_DIR.replace("/", ".")
    return [
        (f"from {source_package} import {stem}_pb2", f"from {TARGET_PACKAGE} import {stem}_pb2"),
        (f"'{source_package}.{stem}_pb2'", f"'{TARGET_PACKAGE}.{stem}_pb2'"),
        (f"{PROTO_DIR}/{stem}_pb2_grpc.py", f"server/rpc/{stem}_pb2_grpc.py"),
    ]


def generate(out_dir: str, proto_root: str = PROTO_ROOT) -> list[str]:
    """Run protoc on ``proto/`` and write the ``funnel.server.rpc`` stubs into ``out_dir``.

    Args:
        out_dir: existing directory that receives ``<name>_pb2.py``, ``<name>_pb2.pyi``
            and ``<name>_pb2_grpc.py`` for every file in ``PROTO_FILES``.
        proto_root: the repository's ``proto/`` folder (a wheel does not ship it, so
            a check run against an installed wheel names the checkout's).

    Returns:
        Paths of the written files, sorted.

    Raises:
        RuntimeError: protoc failed, or its output no longer has the module references
            this tool rewrites (a grpcio-tools change that needs a look).
    """
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    written = []
    with tempfile.TemporaryDirectory() as raw:
        sources = [f"{PROTO_DIR}/{name}" for name in PROTO_FILES]
        args = ["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={raw}", f"--pyi_out={raw}", f"--grpc_python_out={raw}", *sources]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for name in PROTO_FILES:
            stem = name.removesuffix(".proto")
            files = {suffix: os.path.join(raw, PROTO_DIR, stem + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")}
            texts = {suffix: open(path, encoding="utf-8").read() for suffix, path in files.items()}
            for old, new in _module_rewrites(stem):
                hits = [suffix for suffix, text in texts.items() if old in text]
                if not hits:
                    raise RuntimeError(f"protoc output for {name} has no {old!r} to rewrite; check tools/gen_proto.py")
                for suffix in hits:
                    texts[suffix] = texts[suffix].replace(old, new)
            for suffix, text in texts.items():
                path = os.path.join(out_dir, stem + suffix)
                with open(path, "w", encoding="utf-8", newline="\n") as f:
                    f.write(text)
                written.append(path)
    return sorted(written)


def main() -> int:
    """Regenerate the checked-in stubs in ``server/rpc/``.

    Returns:
        Process exit status (0).
    """
    for path in generate(DEFAULT_OUT):
        print(os.path.relpath(path, REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
