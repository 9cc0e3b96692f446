"""``funnel evaluate``: full-ranking evaluation of a bundle on the test targets of a split.

A thin command over :func:`evaluation.protocol.evaluate_bundle` (see there for the
protocol): it prints the metric tables and writes the JSON and HTML reports.
"""

import argparse
import os
import sys

from funnel.evaluation.protocol import evaluate_bundle, format_report
from funnel.evaluation.report import curves_json, render_report
from funnel.events.readers import FORMATS
from funnel.events.split import SPLITS
from funnel.recall.runtime import RUNTIMES
from funnel.tools.cli import add_candidates_argument
from funnel.tools.output import write_json, write_text


def evaluate(*, json_out: str | None = None, report_dir: str | None = None, **options) -> dict:
    """Evaluate a bundle and write its reports.

    Args:
        json_out: where to write the JSON report (atomically); None to skip.
        report_dir: directory for ``report.html`` (metric vs K, calibration) and
            ``curves.json``, both written atomically; None to skip.
        options: the keyword arguments of :func:`evaluation.protocol.evaluate_bundle`.

    Returns:
        The report.
    """
    report, curves = evaluate_bundle(**options, curves=report_dir is not None)
    if json_out:
        write_json(json_out, report)
    if report_dir:
        write_report(report_dir, report, curves, format_report(report))
    return report


def write_report(out_dir: str, report: dict, curves: dict, summary: str) -> str:
    """Write ``out_dir/report.html`` (:func:`evaluation.report.render_report`) and ``out_dir/curves.json`` atomically, ``out_dir`` created if missing.

    Returns:
        The path of the HTML file.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "report.html")
    write_text(path, render_report(report, curves, summary))
    write_text(os.path.join(out_dir, "curves.json"), curves_json(curves))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle root (with CURRENT) or a version directory")
    parser.add_argument("--events", required=True, help="the behaviour log to evaluate on (normally the training log)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="taobao", help="log format (default: taobao)")
    parser.add_argument("--split", choices=SPLITS, default="leave-last-out", help="must match the split used in training (default: leave-last-out)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="bad rows: stop (fail, default) or skip")
    parser.add_argument("--json", dest="json_out", default=None, help="write the report as JSON to this path")
    parser.add_argument(
        "--report", dest="report_dir", default=None, metavar="DIR",
        help="write DIR/report.html (HR/NDCG vs K for recall, final and baselines; ranker calibration) and DIR/curves.json",
    )
    add_candidates_argument(parser, "to see what serving with them costs in quality")
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default="onnx",
        help="score with ONNX Runtime over the bundle's exports, as the server does (onnx, default), or with the PyTorch models (torch)",
    )
    parser.add_argument(
        "--users", type=int, default=0, metavar="N",
        help="score a fixed random sample of N test users (drawn with --seed; default 0: every test user). On a 1M-user log, 10000 users "
        "measure the same quantities in minutes",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --users sample (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (off anyway when stderr is not a terminal)")


def run(args: argparse.Namespace) -> int:
    report = evaluate(
        bundle=args.bundle, events=args.events, fmt=args.fmt, split=args.split, on_error=args.on_error,
        json_out=args.json_out, report_dir=args.report_dir, progress=not args.no_progress and sys.stderr.isatty(), candidates=args.candidates,
        runtime=args.runtime, max_users=args.users, seed=args.seed,
    )
    print(format_report(report))
    if args.report_dir:
        print(f"report: {os.path.join(args.report_dir, 'report.html')}")
    return 0
