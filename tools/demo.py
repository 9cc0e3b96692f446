"""``funnel demo``: the quickstart. Generates a synthetic log, trains both stages, starts
a gRPC server on a free local port, sends one Recommend call for an active user, prints
the ranked items next to what the user did recently, and stops the server."""

import argparse
import os

import numpy as np

from funnel.events.synth import SynthConfig, generate
from funnel.rank.train import RankerTrainConfig
from funnel.recall.train import TwoTowerTrainConfig
from funnel.server.app import create_server
from funnel.server.engine import Engine
from funnel.tools.recommend import format_result, recommend, wait_ready
from funnel.tools.train import train


def demo(*, workdir: str = "quickstart", users: int = 500, items: int = 3000, categories: int = 30, seed: int = 0, k: int = 10, progress: bool = True) -> str:
    """Run the quickstart end to end.

    Args:
        workdir: where the synthetic log and the bundle go.
        users, items, categories: synthetic data size.
        seed: data and model seed.
        k: items to ask for.
        progress: progress bars.

    Returns:
        The printed report (ranked list with titles/categories).
    """
    os.makedirs(workdir, exist_ok=True)
    events = os.path.join(workdir, "events.csv")
    stats = generate(events, SynthConfig(n_users=users, n_items=items, n_categories=categories, events_per_user=40.0, seed=seed), progress=progress)
    print(f"synthetic log: {events} ({stats.rows:,} rows)")
    version = train(
        events=events,
        out=os.path.join(workdir, "bundle"),
        seed=seed,
        two_tower=TwoTowerTrainConfig(epochs=10),
        ranker=RankerTrainConfig(epochs=4),
        progress=progress,
    )
    engine = Engine.load(version)
    server, port = create_server("127.0.0.1:0", engine)
    server.start()
    try:
        addr = f"127.0.0.1:{port}"
        wait_ready(addr, timeout=10.0)
        data = engine.bundle.data
        user = int(np.argmax(data.seqs.lengths))
        user_id = str(data.users.decode(np.array([user]))[0])
        lo, hi = data.seqs.offsets[user], data.seqs.offsets[user + 1]
        recent = data.categories.decode(data.seqs.categories[max(lo, hi - 10) : hi])
        result = recommend(addr=addr, user_id=user_id, k=k, request_id="quickstart")
        report = "\n".join(
            [
                f"server on {addr}, bundle {engine.model_version}",
                f"user {user_id}: {hi - lo} events; categories of the last 10: {' '.join(recent)}",
                format_result(result),
            ]
        )
        print(report)
        print(next_steps(workdir, events, user_id))
        return report
    finally:
        server.stop(grace=1.0).wait()


def next_steps(workdir: str, events: str, user_id: str) -> str:
    """The three commands to try after the demo, on its own log and bundle."""
    bundle = os.path.join(workdir, "bundle")
    return "\n".join(
        [
            "",
            "next, try:",
            f"  funnel evaluate --bundle {bundle} --events {events} --report {os.path.join(workdir, 'report')}   # quality against baselines, HTML report",
            f"  funnel serve --bundle-root {bundle}   # a server on 127.0.0.1:50051 (leave it running)",
            f"  funnel recommend --addr 127.0.0.1:50051 --user {user_id} -k 10 --why   # from another terminal: the list, explained",
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="quickstart", help="where the synthetic log and the bundle go (default: ./quickstart)")
    parser.add_argument("--users", type=int, default=500, help="synthetic users (default: 500)")
    parser.add_argument("--items", type=int, default=3000, help="synthetic items (default: 3000)")
    parser.add_argument("--seed", type=int, default=0, help="data and model seed (default: 0)")
    parser.add_argument("-k", type=int, default=10, help="items to recommend (default: 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    demo(workdir=args.workdir, users=args.users, items=args.items, seed=args.seed, k=args.k, progress=not args.no_progress)
    return 0
