"""``funnel rebuild-index``: rebuild a bundle's index with another spec, verify it, swap it in.

The new index is checked against exact search on real user vectors (the bundle's own
users) and published only if its recall@k clears ``min_recall``; otherwise the old
index stays and the command fails with the measured figure.
"""

import argparse
import json
import logging
import time

import faiss
import numpy as np

from funnel.bundle import Bundle, load_bundle, replace_index
from funnel.evaluation.metrics import overlap_recall
from funnel.recall.index import AUTO_IVF_MIN_ITEMS, MIN_GATE_RECALL, IndexSpec, build_index, resolve, search, tune_nprobe
from funnel.recall.scoring import exact_topk, subset_rows
from funnel.recall.train import item_vectors, serving_user_vectors
from funnel.tools.bench_index import queries_per_second

log = logging.getLogger("funnel.rebuild_index")

# Seconds spent timing one-query-at-a-time search (the serving case) for each of exact
# search and the new index: enough for hundreds of exact searches over a million items.
SINGLE_QUERY_BUDGET_S = 2.0
# Scores this close to exact search's k-th count as ties with it (float32 dot products of
# unit vectors differ in about the 7th digit between BLAS and faiss).
TIE_TOLERANCE = 1e-5


class IndexRejected(RuntimeError):
    """The rebuilt index's recall against exact search is below the required minimum."""


def rebuild_index(*, bundle: str, index: str, min_recall: float = MIN_GATE_RECALL, k: int = 200, sample_users: int = 1000, seed: int = 0) -> dict:
    """Embed the catalogue with the bundle's item tower, build ``index``, validate, publish.

    Args:
        bundle: bundle root (with ``CURRENT``).
        index: the new index spec, e.g. ``ivf:nlist=1024,nprobe=32``.
        min_recall: publish only if recall@k against exact search reaches this.
        k: the depth compared (the recall stage's candidate count).
        sample_users: users whose current vectors are the validation queries.
        seed: which users are sampled.

    Returns:
        A report: the resolved spec, catalogue size, recall (id overlap, which decides,
        and the tie-aware figure beside it), seconds per step (loading the bundle;
        embedding, building and validating, and the total of those three), queries/s of
        the new index and of exact search with all sampled users in one batch
        (``exact_qps``, ``index_qps``, ``speedup``) and one query at a time as in serving
        (the ``*_single`` keys), and the published version.

    Raises:
        IndexRejected: when recall is below ``min_recall`` (nothing is published).
    """
    t0 = time.perf_counter()
    b = load_bundle(bundle, upgrade=True)
    started = time.perf_counter()
    vecs = item_vectors(b.two_tower, b.data, b.popularity.counts > 0)
    embedded = time.perf_counter()
    recommendable = b.recommendable
    ids = np.flatnonzero(recommendable)
    requested = IndexSpec.parse(index)
    # IVF settings left out are sized here: nlist from the catalogue, nprobe by probing.
    auto_probe = requested.kind in ("ivf", "ivfpq") and not requested.nprobe
    note = None
    if auto_probe and not requested.nlist and len(ids) < AUTO_IVF_MIN_ITEMS:
        note = f"{len(ids):,} items, fewer than {AUTO_IVF_MIN_ITEMS:,}: an IVF index does not pay off, so exact search (flat) is built instead"
        log.info(note)
        spec = IndexSpec(kind="flat", gpu=requested.gpu)
    else:
        spec = resolve(requested, len(ids))
    log.info("building %s over %d items", spec, len(ids))
    ann = build_index(vecs[ids], ids, spec)
    built = time.perf_counter()
    queries = _validation_queries(b, sample_users, seed)
    k = min(k, len(ids))
    tried = None
    if auto_probe and spec.kind != "flat":
        log.info("built in %.0f s; finding the fewest probes with recall@%d >= %.2f on %d users", built - embedded, k, min_recall, len(queries))
        spec, tried = tune_nprobe(ann, spec, queries, vecs, recommendable, k, min_recall)
        log.info("probes tried (recall@%d): %s", k, ", ".join(f"{name.rsplit('nprobe=', 1)[-1]}: {r:.4f}" for name, r in tried.items()))
    log.info("validating %s against exact search on %d users", spec, len(queries))
    recall, speeds = _validate(ann, queries, vecs, recommendable, k)
    done = time.perf_counter()
    report = {
        "index": str(spec),
        "requested": index,
        "note": note,
        "nprobe_tried": tried,
        "items": len(ids),
        "dim": int(vecs.shape[1]),
        "k": k,
        "queries": len(queries),
        "recall_at_k": round(recall, 5),
        **speeds,
        "load_seconds": round(started - t0, 2),
        "embed_seconds": round(embedded - started, 2),
        "build_seconds": round(built - embedded, 2),
        "validate_seconds": round(done - built, 2),
        "total_seconds": round(done - started, 2),
    }
    log.info("%s over %d items: recall@%d %.4f, %.1f s to embed, build and validate", spec, report["items"], k, recall, report["total_seconds"])
    if recall < min_recall:
        hint = (
            f"probing up to a quarter of the cells ({tried}) was not enough: try more cells per item (a smaller nlist), or --index flat"
            if tried
            else f"try a higher nprobe (e.g. ivf:nlist={spec.nlist},nprobe={min(spec.nprobe * 4, spec.nlist)}), or leave nprobe out to have it probed"
            if spec.kind in ("ivf", "ivfpq")
            else "try a wider search (e.g. a larger ef_search), or --index flat"
        )
        raise IndexRejected(f"index {spec} reaches recall@{k} {recall:.4f} against exact search, below --min-recall {min_recall}; the old index stays. {hint}")
    report["version"] = replace_index(bundle, index=ann, index_spec=spec, item_vecs=vecs, info={"index_validation": report}, models=(b.two_tower, b.ranker))
    return report


def _validation_queries(b: Bundle, sample_users: int, seed: int) -> np.ndarray:
    # Each sampled user's vector as the server asks for it (recall.train.serving_user_vectors).
    seqs = b.data.seqs
    active = np.flatnonzero(seqs.lengths > 0)
    users = np.sort(np.random.default_rng(seed).choice(active, min(sample_users, len(active)), replace=False))
    return serving_user_vectors(b.two_tower, b.data, users)


def _validate(ann: faiss.Index, queries: np.ndarray, vecs: np.ndarray, among: np.ndarray, k: int) -> tuple[float, dict]:
    """Recall@k of ``ann`` against exact search over the items it holds (``among``), and both speeds in one batch and one query at a time."""
    # Exact search scans the same items as the index, gathered once outside the timings.
    rows = subset_rows(among)
    held = np.ascontiguousarray(vecs[rows])
    t0 = time.perf_counter()
    exact, exact_scores = exact_topk(queries, held, k)
    exact = rows[exact]
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx, _ = search(ann, queries, k)
    ann_s = time.perf_counter() - t0
    exact_single = queries_per_second(lambda q: exact_topk(q, held, k), queries, 1, SINGLE_QUERY_BUDGET_S)
    index_single = queries_per_second(lambda q: search(ann, q, k), queries, 1, SINGLE_QUERY_BUDGET_S)
    return float(overlap_recall(approx, exact)), {
        "tie_aware_recall_at_k": round(_tie_aware_recall(queries, vecs, approx, exact_scores[:, -1]), 5),
        "exact_qps": round(len(queries) / exact_s, 1),
        "index_qps": round(len(queries) / ann_s, 1),
        "speedup": round(exact_s / ann_s, 2),
        "exact_qps_single": round(exact_single, 1),
        "index_qps_single": round(index_single, 1),
        "speedup_single": round(index_single / exact_single, 2),
    }


def _tie_aware_recall(queries: np.ndarray, vecs: np.ndarray, approx: np.ndarray, kth_score: np.ndarray) -> float:
    """Share of returned ids whose true score reaches exact search's k-th score.

    Id overlap cannot reach 1 when many items tie at the k-th score (cold items sit on
    their category's vector, so thousands can share one score): exact search keeps an
    arbitrary few of them. This figure counts any of the tied items as found.
    """
    scores = np.einsum("qd,qkd->qk", queries, vecs[np.maximum(approx, 0)])
    return float(((scores >= kth_score[:, None] - TIE_TOLERANCE) & (approx >= 0)).mean())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle root (with CURRENT); a new version with the new index is published there")
    parser.add_argument("--index", required=True, help="index spec: flat | ivf:nlist=N,nprobe=P[,codes=f16|f32|sq8] | ivfpq:nlist=N,m=M,nprobe=P | hnsw:m=M,ef_search=E; IVF settings left out are sized to the catalogue; ivf stores vectors as 16-bit floats unless codes says otherwise")
    parser.add_argument("--min-recall", type=float, default=MIN_GATE_RECALL, help=f"publish only if recall@k against exact search reaches this (default: {MIN_GATE_RECALL})")
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
