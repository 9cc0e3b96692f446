"""``funnel seeds``: train and evaluate the whole pipeline once per seed, report mean and spread.

One seed's figure says little on a data set the size of MovieLens-100k: the spread
between seeds is often as large as the gap between two models. This runs ``train`` and
``evaluate`` for each seed on the same log and split, then summarises every metric of
the recall stage (merged and per channel), the final ranking, the lift and the
wall-clock seconds as mean, standard deviation, minimum and maximum.
"""

import argparse
import logging
import os
import time

from funnel.evaluation.protocol import evaluate_bundle
from funnel.evaluation.summary import SECTIONS, SHOWN, flatten_report, format_summary, summarize_runs
from funnel.events.readers import FORMATS
from funnel.events.split import SPLITS
from funnel.tools.output import write_json
from funnel.tools.train import train

log = logging.getLogger("funnel.seeds")

def run_seeds(
    *,
    events: str,
    out: str,
    fmt: str = "taobao",
    split: str = "leave-last-out",
    seeds: tuple[int, ...] = (0, 1, 2),
    items: str | None = None,
    json_out: str | None = None,
    progress: bool = False,
) -> dict:
    """Train and evaluate once per seed.

    Args:
        events, fmt, split, items: as for ``funnel train``.
        out: directory; seed ``s`` publishes its bundle under ``out/seed<s>``.
        seeds: the seeds to run.
        json_out: where to write the result (atomically); None to skip.
        progress: progress bars of the inner runs.

    Returns:
        ``{"runs": [{"seed", "bundle", "train_seconds", "evaluate_seconds", "metrics"}],
        "summary": {metric: {"mean", "std", "min", "max"}}}`` where metric names are dotted
        paths into the evaluate report, e.g. ``final.ndcg@10``.
    """
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        version = train(events=events, out=os.path.join(out, f"seed{seed}"), fmt=fmt, items=items, split=split, seed=seed, progress=progress)
        t1 = time.perf_counter()
        report, _ = evaluate_bundle(bundle=version, events=events, fmt=fmt, split=split, progress=progress)
        t2 = time.perf_counter()
        metrics = {**flatten_report({s: report[s] for s in SECTIONS if s in report}), "train_seconds": round(t1 - t0, 1), "evaluate_seconds": round(t2 - t1, 1)}
        runs.append({"seed": seed, "bundle": version, "metrics": metrics})
        log.info("seed %d: %s", seed, ", ".join(f"{k} {metrics[k]}" for k in SHOWN if k in metrics))
    result = {"events": events, "split": split, "seeds": list(seeds), "runs": runs, "summary": summarize_runs([r["metrics"] for r in runs])}
    if json_out:
        write_json(json_out, result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", required=True, help="behaviour log: a Taobao CSV, a MovieLens directory or a parquet file")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="taobao", help="log format (default: taobao)")
    parser.add_argument("--items", default=None, help="optional catalogue CSV, as for train")
    parser.add_argument("--split", choices=SPLITS, default="leave-last-out", help="split for training and evaluation (default: leave-last-out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default: 0 1 2)")
    parser.add_argument("--out", required=True, help="directory for the per-seed bundles (OUT/seed<S>)")
    parser.add_argument("--json", dest="json_out", default=None, help="write every run and the summary here")


def run(args: argparse.Namespace) -> int:
    result = run_seeds(events=args.events, out=args.out, fmt=args.fmt, split=args.split, seeds=tuple(args.seeds), items=args.items, json_out=args.json_out)
    print(format_summary(result))
    return 0
