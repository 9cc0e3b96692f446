"""``python -m funnel.tools.bench_index``: each index spec against exact search on a synthetic catalogue.

The catalogue imitates trained item-tower vectors: L2-normalised, scattered around a few
thousand centres (categories) of uneven size. Queries imitate user vectors: a mix of one
to three interest centres, weighted by how popular each centre is, plus noise, so they
fall near item clusters and sometimes between them.

Exact search is measured two ways, faiss ``IndexFlatIP`` and the torch matmul + top-k of
:func:`recall.scoring.exact_topk`, and every speed-up is taken against the faster of the
two at the same batch size in the same run. Batch 1 is the serving case; batch 256 shows
what offline scoring sees, where exact search gets the full benefit of BLAS.
"""

import argparse
import time
from collections.abc import Callable, Sequence

import faiss
import numpy as np
import torch

from funnel.evaluation.metrics import overlap_recall
from funnel.recall.index import IndexSpec, build_index, resolve, search
from funnel.recall.scoring import exact_topk
from funnel.tools.output import write_json

DEFAULT_SPECS = ("ivf", "ivf:nprobe=1", "ivfpq:m=16")
BATCHES = (1, 256)
# Seconds spent timing one searcher at one batch size: batch-1 exact search over 1M items
# costs milliseconds per query, so timing all queries one by one would dominate the run.
TIME_BUDGET_S = 5.0

SearchFn = Callable[[np.ndarray], np.ndarray]


def synthetic_catalogue(n_items: int, dim: int, rng: np.random.Generator, centres: int = 3000, spread: float = 0.07) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit item vectors around random unit centres with power-law cluster sizes.

    Args:
        n_items: catalogue size.
        dim: vector width.
        rng: random source.
        centres: clusters (categories).
        spread: per-coordinate noise around a centre; 0.07 at 64 dims puts items at a
            median cosine of about 0.88 to their centre, as a trained bundle's item
            vectors are to their category's mean.

    Returns:
        (items [n_items, dim], centres [centres, dim], centre popularity [centres] summing to 1), float32 / float64.
    """
    centre_vecs = _unit(rng.standard_normal((centres, dim)))
    popularity = 1.0 / np.arange(1, centres + 1) ** 0.8
    popularity /= popularity.sum()
    members = rng.choice(centres, n_items, p=popularity)
    items = centre_vecs[members] + spread * rng.standard_normal((n_items, dim), dtype=np.float32)
    return _unit(items), centre_vecs, popularity


def synthetic_queries(centres: np.ndarray, popularity: np.ndarray, n: int, rng: np.random.Generator, spread: float = 0.07) -> np.ndarray:
    """Unit user-like vectors: a random convex mix of one to three popular centres, plus noise.

    Returns:
        [n, dim] float32.
    """
    mixes = rng.integers(1, 4, n)
    picks = rng.choice(len(centres), (n, 3), p=popularity)
    weights = rng.dirichlet(np.ones(3), n) * (np.arange(3) < mixes[:, None])
    weights /= weights.sum(axis=1, keepdims=True)
    users = np.einsum("nc,ncd->nd", weights, centres[picks])
    return _unit(users + spread * rng.standard_normal(users.shape))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def queries_per_second(search_fn: SearchFn, queries: np.ndarray, batch: int, budget_s: float = TIME_BUDGET_S) -> float:
    """Throughput of ``search_fn`` fed ``batch`` queries at a time, for at most about ``budget_s`` seconds.

    Args:
        search_fn: takes [b, d] queries and returns their results.
        queries: [Q, d]; batches are taken in order, at least one is always timed.
        batch: queries per call.
        budget_s: stop starting new batches after this long.

    Returns:
        Queries answered per second.
    """
    search_fn(queries[:batch])  # warm caches and lazily allocated buffers
    done, started = 0, time.perf_counter()
    for lo in range(0, len(queries), batch):
        search_fn(queries[lo : lo + batch])
        done += len(queries[lo : lo + batch])
        if time.perf_counter() - started >= budget_s:
            break
    return done / (time.perf_counter() - started)


def exact_searchers(items: np.ndarray, k: int) -> dict[str, SearchFn]:
    """Both exact searches over ``items`` (ids are row numbers + 1, like item ids), returning [b, k] ids.

    Args:
        items: [n, d] float32 item vectors.
        k: results per query.

    Returns:
        ``{"faiss_flat": fn, "torch_matmul": fn}``.
    """
    flat = faiss.IndexFlatIP(items.shape[1])
    flat.add(items)
    padded = np.vstack([np.zeros((1, items.shape[1]), np.float32), items])  # exact_topk skips row 0
    return {
        "faiss_flat": lambda q: flat.search(q, k)[1] + 1,
        "torch_matmul": lambda q: exact_topk(q, padded, k)[0],
    }


def measure_speed(searchers: dict[str, SearchFn], queries: np.ndarray, batches: Sequence[int] = BATCHES) -> dict[str, dict[str, float]]:
    """Queries/s of each searcher at each batch size. Returns ``{name: {str(batch): qps}}``."""
    return {name: {str(b): round(queries_per_second(fn, queries, b), 1) for b in batches} for name, fn in searchers.items()}


def best_exact(speeds: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per batch size, the faster exact search: ``{str(batch): {"method": name, "qps": qps}}``."""
    batches = next(iter(speeds.values()))
    out = {}
    for b in batches:
        name = max(speeds, key=lambda n: speeds[n][b])
        out[b] = {"method": name, "qps": speeds[name][b]}
    return out


def run_benchmark(
    *,
    n_items: int = 1_000_000,
    dim: int = 64,
    queries: int = 1000,
    k: int = 200,
    specs: Sequence[str] = DEFAULT_SPECS,
    seed: int = 0,
    json_out: str | None = None,
) -> dict:
    """Build exact search and every spec over one synthetic catalogue; compare recall and speed.

    Args:
        n_items, dim: catalogue shape.
        queries: user-like query vectors (recall is averaged over all of them).
        k: the depth compared (the recall stage's candidate count).
        specs: index specs, e.g. ``ivf`` or ``ivf:nlist=2048,nprobe=64``.
        seed: seeds the catalogue and queries.
        json_out: also write the report here.

    Returns:
        The report: the setting, exact search speeds, and per spec the resolved spec,
        build seconds, recall@k against exact search, queries/s and the speed-up over
        the best exact search at each batch size.
    """
    rng = np.random.default_rng(seed)
    items, centres, popularity = synthetic_catalogue(n_items, dim, rng)
    q = synthetic_queries(centres, popularity, queries, rng)
    ids = np.arange(1, n_items + 1)
    exact = exact_searchers(items, k)
    truth = exact["faiss_flat"](q)
    exact_speed = measure_speed(exact, q)
    baseline = best_exact(exact_speed)
    report = {
        "setting": {"n_items": n_items, "dim": dim, "queries": queries, "k": k, "seed": seed, "threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads()},
        "exact": {"qps": exact_speed, "best": baseline},
        "specs": [_bench_spec(text, items, ids, q, truth, k, baseline) for text in specs],
    }
    if json_out:
        write_json(json_out, report)
    return report


def _bench_spec(text: str, items: np.ndarray, ids: np.ndarray, q: np.ndarray, truth: np.ndarray, k: int, baseline: dict) -> dict:
    spec = resolve(IndexSpec.parse(text), len(items))
    started = time.perf_counter()
    index = build_index(items, ids, spec)
    build_s = time.perf_counter() - started
    qps = measure_speed({"index": lambda b: search(index, b, k)[0]}, q)["index"]
    return {
        "spec": str(spec),
        "build_seconds": round(build_s, 2),
        "recall_at_k": round(overlap_recall(search(index, q, k)[0], truth), 4),
        "qps": qps,
        "speedup": {b: round(qps[b] / baseline[b]["qps"], 1) for b in qps},
    }


def format_table(report: dict) -> str:
    """The report as a plain-text table, one row per exact search and per spec."""
    s = report["setting"]
    batches = list(report["exact"]["best"])
    head = f"{s['n_items']:,} items × {s['dim']} dims, {s['queries']} queries, recall@{s['k']}, {s['threads']} threads"
    cols = "".join(f"{'qps@b' + b:>12}{'×exact':>8}" for b in batches)
    lines = [head, f"{'index':<34}{'build s':>9}{'recall':>8}{cols}"]
    for name, qps in report["exact"]["qps"].items():
        cells = "".join(f"{qps[b]:>12,.0f}{'best' if report['exact']['best'][b]['method'] == name else '':>8}" for b in batches)
        lines.append(f"{'exact (' + name + ')':<34}{'':>9}{1.0:>8.4f}{cells}")
    for row in report["specs"]:
        cells = "".join(f"{row['qps'][b]:>12,.0f}{row['speedup'][b]:>8.1f}" for b in batches)
        lines.append(f"{row['spec']:<34}{row['build_seconds']:>9.1f}{row['recall_at_k']:>8.4f}{cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m funnel.tools.bench_index [--items N] [--spec S ...] [--json out.json]``."""
    p = argparse.ArgumentParser(prog="python -m funnel.tools.bench_index", description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue size (default: 1,000,000)")
    p.add_argument("--dim", type=int, default=64, help="vector width (default: 64)")
    p.add_argument("--queries", type=int, default=1000, help="query vectors (default: 1000)")
    p.add_argument("-k", type=int, default=200, help="depth of the recall comparison (default: 200)")
    p.add_argument("--spec", action="append", help=f"index spec, repeatable (default: {' '.join(DEFAULT_SPECS)})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    args = p.parse_args(argv)
    report = run_benchmark(
        n_items=args.items, dim=args.dim, queries=args.queries, k=args.k, specs=args.spec or DEFAULT_SPECS, seed=args.seed, json_out=args.json_out
    )
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
