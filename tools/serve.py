"""``funnel serve``: serve a bundle over gRPC until SIGINT/SIGTERM (graceful shutdown)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle root (with CURRENT) or a version directory")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one (default: 50051)")
    parser.add_argument("--workers", type=int, default=8, help="request threads (default: 8)")


def run(args: argparse.Namespace) -> int:
    from server.app import serve

    serve(args.bundle, host=args.host, port=args.port, max_workers=args.workers)
    return 0
