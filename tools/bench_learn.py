"""``python -m funnel.tools.bench_learn``: online learning on a drifting stream, against the frozen base bundle.

1. ``funnel synth`` writes a log with items released over time and shifting tastes.
2. A base bundle is trained on its first ``--base-share`` by time; the rest is the
   stream, cut by time into ``--chunks`` chunks of equal event counts.
3. A ``funnel serve`` process serves the bundle root with an event log. Each chunk is
   sent through ``LogEvents``, then one ``funnel learn`` cycle runs.
4. From the start of the second-last cycle a ``funnel loadtest`` sends ``Recommend`` at
   ``--load-qps`` for ``--load-seconds``, long enough that both last cycles publish
   during it (the report lists the versions that answered).
5. For every chunk after the first: HR@10 and NDCG@10 on each user's first event of the
   chunk (history: everything logged before it) of the frozen base bundle and of the
   bundle learned through the chunk before, both scored the same way (as a server with
   the logged events sees them: events on items a bundle does not know are left out,
   and such targets are misses).

Prints a summary and writes the report as JSON.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pandas as pd

from funnel.bundle import load_bundle, resolve
from funnel.events.eventlog import read_event_store_since
from funnel.events.schema import TAOBAO_COLUMNS
from funnel.server.rpc import recommender_pb2, recommender_pb2_grpc
from funnel.tools.learn import LEARNING_LOG, holdout_scores, known_only
from funnel.tools.output import write_json
from funnel.tools.recommend import wait_ready

LOG_BATCH = 5_000
"""Events per LogEvents call (the rpc takes up to 10,000)."""


def next_events(bundle_dir: str, event_log: str, *, upto_seq: int, start_ts: int, k: int = 10) -> dict:
    """HR and NDCG at ``k`` of a bundle on each user's first logged event at or after ``start_ts``.

    Args:
        bundle_dir: the bundle version to score.
        event_log: the event store; its events up to ``upto_seq`` that the bundle does not
            hold yet are added to the users' histories.
        upto_seq: last event-store sequence number of the chunk being predicted.
        start_ts: the chunk's first timestamp.
        k: cut-off.

    Returns:
        ``{"users", "hr@k", "ndcg@k"}``.
    """
    bundle = load_bundle(bundle_dir)
    after = int((bundle.manifest.get("learning") or {}).get("event_seq", 0))
    window, _ = read_event_store_since(event_log, after, upto_seq)
    data, fresh = bundle.data.grow(window)
    seqs = data.seqs
    # Each user's first event of the chunk: the first fresh position at or after start_ts.
    candidate = fresh & (seqs.ts >= start_ts)
    users = seqs.user_positions()[candidate]
    positions = np.flatnonzero(candidate)
    first = np.r_[True, users[1:] != users[:-1]]
    users, positions = users[first], positions[first]
    scores = holdout_scores(bundle.pipeline(), known_only(seqs, bundle.data.items.size), bundle.data.items.size, users, positions, seqs, k)
    return {"users": int(len(users)), **scores}


def bench(
    *, out: str, users: int, items: int, categories: int, events_per_user: float, new_items: float, taste_shift: float,
    base_share: float, chunks: int, budget: str, load_qps: float, load_seconds: float, seed: int, reuse: bool = False,
) -> dict:
    """Run the scenario (see the module docstring); returns the report.

    With ``reuse``, a log and base bundle left in ``out`` by an earlier run with the same
    settings are kept: the bundle root is reset to its first version and the stream replayed anew.
    """
    os.makedirs(out, exist_ok=True)
    py = [sys.executable, "-m", "funnel.tools"]
    log_path, root, store = os.path.join(out, "log.csv"), os.path.join(out, "bundle"), os.path.join(out, "events.db")
    versions = os.path.join(root, "versions")
    reuse = reuse and os.path.isfile(log_path) and os.path.isdir(versions)
    for stale in (store, store + "-wal", store + "-shm", os.path.join(root, LEARNING_LOG)):
        if os.path.exists(stale):
            os.remove(stale)
    if reuse:
        first = min(v for v in os.listdir(versions) if not v.startswith("."))
        for name in os.listdir(versions):
            if name != first:  # later versions, and what killed runs left staged
                shutil.rmtree(os.path.join(versions, name))
        with open(os.path.join(root, "CURRENT"), "w") as fh:
            fh.write(first + "\n")
    else:
        subprocess.run([*py, "synth", "--out", log_path, "--users", str(users), "--items", str(items), "--categories", str(categories),
                        "--events-per-user", str(events_per_user), "--new-items", str(new_items), "--taste-shift", str(taste_shift),
                        "--seed", str(seed), "--no-progress"], check=True)
    df = pd.read_csv(log_path, header=None, names=list(TAOBAO_COLUMNS))
    df = df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    n_base = int(len(df) * base_share)
    base_path = os.path.join(out, "base.csv")
    df.iloc[:n_base].sort_values(["user_id", "timestamp"], kind="stable").to_csv(base_path, header=False, index=False)
    rest = df.iloc[n_base:]
    bounds = np.linspace(0, len(rest), chunks + 1).astype(int)
    started = time.time()
    if not reuse:
        subprocess.run([*py, "train", "--events", base_path, "--out", root, "--budget", budget, "--no-progress", "--seed", str(seed)], check=True)
    base_dir = resolve(root)
    report: dict = {"config": {k: v for k, v in locals().items() if k in ("users", "items", "categories", "events_per_user", "new_items", "taste_shift", "base_share", "chunks", "budget", "load_qps", "load_seconds", "seed")},
                    "rows": {"log": len(df), "base": n_base, "stream": len(rest)}, "base_train_seconds": round(time.time() - started, 1), "cycles": [], "chunks": []}
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    server = subprocess.Popen([*py, "serve", "--bundle-root", root, "--event-log", store, "--port", str(port), "--processes", "1"])
    load = None
    try:
        wait_ready(addr, 120)
        stub = recommender_pb2_grpc.RecommenderStub(grpc.insecure_channel(addr))
        seqs_after, current = [], [base_dir]
        for c in range(chunks):
            chunk = rest.iloc[bounds[c] : bounds[c + 1]]
            for lo in range(0, len(chunk), LOG_BATCH):
                part = chunk.iloc[lo : lo + LOG_BATCH]
                events = [recommender_pb2.Event(user_id=str(u), item_id=str(i), category_id=str(cat), behavior=b, timestamp=int(t))
                          for u, i, cat, b, t in zip(part.user_id, part.item_id, part.category_id, part.behavior_type, part.timestamp)]
                stub.LogEvents(recommender_pb2.LogEventsRequest(events=events), timeout=60)
            seqs_after.append(bounds[c + 1])  # the store holds exactly the stream so far
            if c == chunks - 2 and load_qps > 0:
                load = subprocess.Popen([*py, "loadtest", "--addr", addr, "--qps", str(load_qps), "--duration", str(load_seconds), "--users-from", base_path,
                                         "--json", os.path.join(out, "load.json")], stdout=subprocess.DEVNULL)
            # Learning is background work: below the servers in CPU priority, as the README advises.
            subprocess.run(["nice", "-n", "10", *py, "learn", "--bundle-root", root, "--event-log", store, "--no-progress"], check=True)
            with open(os.path.join(root, LEARNING_LOG)) as fh:
                cycle = json.loads(fh.read().splitlines()[-1])
            report["cycles"].append({"chunk": c + 1, "events": cycle["events"], "outcome": cycle["outcome"], "seconds": cycle["seconds"],
                                     "reasons": cycle.get("gate", {}).get("reasons"), "holdouts": cycle.get("gate", {}).get("holdouts"),
                                     "stages": {k: v["seconds"] for k, v in cycle.get("stages", {}).items()}})
            current.append(resolve(root))
            print(f"chunk {c + 1}: {len(chunk):,} events logged; cycle {cycle['outcome']} in {cycle['seconds']:.0f} s", flush=True)
        if load is not None:
            load.wait()
            with open(os.path.join(out, "load.json")) as fh:
                lt = json.load(fh)
            report["load"] = {"qps": load_qps, "seconds": load_seconds, "recommend": lt.get("recommend", lt)}
    finally:
        server.terminate()
        server.wait()
        if load is not None and load.poll() is None:
            load.kill()
    for c in range(1, chunks):
        start_ts = int(rest["timestamp"].iloc[bounds[c]])
        base = next_events(base_dir, store, upto_seq=seqs_after[c], start_ts=start_ts)
        learned = next_events(current[c], store, upto_seq=seqs_after[c], start_ts=start_ts)
        ratio = learned["hr@10"] / base["hr@10"] if base["hr@10"] else float("inf")
        report["chunks"].append({"chunk": c + 1, "base": base, "learned": learned, "learned_version": os.path.basename(current[c]), "hr@10_ratio": round(ratio, 3)})
        print(f"chunk {c + 1}: HR@10 base {base['hr@10']:.4f}, learned through chunk {c} {learned['hr@10']:.4f} ({ratio:.2f}x) on {base['users']:,} users", flush=True)
    return report


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m funnel.tools.bench_learn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="working directory (log, bundle root, event store, reports)")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--categories", type=int, default=200)
    parser.add_argument("--events-per-user", type=float, default=80.0)
    parser.add_argument("--new-items", type=float, default=0.3, help="synth --new-items (default: 0.3)")
    parser.add_argument("--taste-shift", type=float, default=0.5, help="synth --taste-shift (default: 0.5)")
    parser.add_argument("--base-share", type=float, default=0.7, help="share of the log (by time) the base bundle trains on (default: 0.7)")
    parser.add_argument("--chunks", type=int, default=5, help="chunks the rest is replayed in, one learn cycle after each (default: 5)")
    parser.add_argument("--budget", default="8m", help="funnel train --budget of the base bundle (default: 8m)")
    parser.add_argument("--load-qps", type=float, default=100.0, help="Recommend load during the last two cycles; 0: none (default: 100)")
    parser.add_argument("--load-seconds", type=float, default=300.0, help="length of that load; it should outlast two cycles (default: 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="keep the log and base bundle an earlier run left in --out (same settings), replay the stream anew")
    parser.add_argument("--json", dest="json_out", default=None, help="write the report here too")
    args = parser.parse_args(argv)
    report = bench(
        out=args.out, users=args.users, items=args.items, categories=args.categories, events_per_user=args.events_per_user, new_items=args.new_items,
        taste_shift=args.taste_shift, base_share=args.base_share, chunks=args.chunks, budget=args.budget, load_qps=args.load_qps,
        load_seconds=args.load_seconds, seed=args.seed, reuse=args.reuse,
    )
    print(json.dumps({"chunks": report["chunks"], "load": report.get("load")}, indent=1))
    if args.json_out:
        write_json(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
