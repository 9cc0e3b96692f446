"""``funnel rebuild-index``: rebuild a bundle's index with another spec, verify it, swap it in.

The new index is checked against exact search on real user vectors (the bundle's own
users) and published only if its recall@k clears ``min_recall``; otherwise the old
index stays and the command fails with the measured figure.
"""

import argparse
import json
import logging
import time

import numpy as np

from events.metrics import overlap_recall
from recall.index import IndexSpec, build_index, search
from recall.scoring import exact_topk
from recall.train import item_vectors
from server.bundle import load_bundle, replace_index

log = logging.getLogger("funnel.rebuild_index")


class IndexRejected(RuntimeError):
    """The rebuilt index's recall against exact search is below the required minimum."""


def rebuild_index(*, bundle: str, index: str, min_recall: float = 0.95, k: int = 200, sample_users: int = 1000, seed: int = 0) -> dict:
    """Embed the catalogue with the bundle's item tower, build ``index``, validate, publish.

    Args:
        bundle: bundle root (with ``CURRENT``).
        index: the new index spec, e.g. ``ivf:nlist=1024,nprobe=32``.
        min_recall: publish only if recall@k against exact search reaches this.
        k: the depth compared (the recall stage's candidate count).
        sample_users: users whose current vectors are the validation queries.
        seed: which users are sampled.

    Returns:
        A report: recall, build seconds, query speed of the new index and of exact
        search, and the published version.

    Raises:
        IndexRejected: when recall is below ``min_recall`` (nothing is published).
    """
    b = load_bundle(bundle)
    spec = IndexSpec.parse(index)
    vecs = item_vectors(b.two_tower, b.data, b.popularity.counts > 0)
    started = time.perf_counter()
    ann = build_index(vecs[1:], np.arange(1, len(vecs)), spec)
    build_s = time.perf_counter() - started

    seqs = b.data.seqs
    active = np.flatnonzero(seqs.lengths > 0)
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(active, min(sample_users, len(active)), replace=False))
    retriever = b.pipeline().retriever
    # Each user's current vector: everything they did, as of their latest event.
    queries = retriever.user_vectors(seqs.user_window(users, b.two_tower.cfg.history), seqs.ts[seqs.offsets[users + 1] - 1])
    k = min(k, len(vecs) - 1)
    t0 = time.perf_counter()
    exact, _ = exact_topk(queries, vecs, k)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx, _ = search(ann, queries, k)
    ann_s = time.perf_counter() - t0
    recall = overlap_recall(approx, exact)
    report = {
        "index": str(spec),
        "recall_at_k": round(float(recall), 5),
        "k": k,
        "queries": int(len(users)),
        "build_seconds": round(build_s, 2),
        "exact_qps": round(len(users) / exact_s, 1),
        "index_qps": round(len(users) / ann_s, 1),
        "speedup": round(exact_s / ann_s, 2),
    }
    if recall < min_recall:
        raise IndexRejected(f"index {spec} reaches recall@{k} {recall:.4f} against exact search, below --min-recall {min_recall}; the old index stays")
    report["version"] = replace_index(bundle, ann, spec, {"index_validation": report})
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle root (with CURRENT); a new version with the new index is published there")
    parser.add_argument("--index", required=True, help="index spec: flat | ivf:nlist=N,nprobe=P | ivfpq:nlist=N,m=M,nprobe=P | hnsw:m=M,ef_search=E")
    parser.add_argument("--min-recall", type=float, default=0.95, help="publish only if recall@k against exact search reaches this (default: 0.95)")
    parser.add_argument("-k", type=int, default=200, help="depth of the recall comparison (default: 200)")
    parser.add_argument("--sample-users", type=int, default=1000, help="users whose vectors validate the index (default: 1000)")


def run(args: argparse.Namespace) -> int:
    try:
        report = rebuild_index(bundle=args.bundle, index=args.index, min_recall=args.min_recall, k=args.k, sample_users=args.sample_users)
    except IndexRejected as err:
        print(f"error: {err}")
        return 1
    print(json.dumps(report, indent=2))
    return 0
