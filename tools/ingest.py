"""``funnel ingest``: parse and check a behaviour log once into a parquet file.

Later ``train --format parquet`` and ``evaluate --format parquet`` read the parquet
file without parsing CSV again. A Taobao CSV is streamed in blocks, so memory stays
flat at any size; bad rows stop the run naming ``file:line: reason`` (or, with
``--on-error skip``, are dropped and counted by reason). Ids of a Taobao log are stored
as 64-bit integers, so an id with a leading zero (``007``) or of more than 18 digits is
a bad row. The output appears only once it is complete.
"""

import argparse
import sys

from funnel.events.ingest import INGEST_FORMATS, ingest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("events", help="the behaviour log: a Taobao-format CSV (headerless) or a MovieLens directory")
    parser.add_argument("--out", required=True, help="the parquet file to write, e.g. events.parquet (replaced atomically)")
    parser.add_argument("--format", dest="fmt", choices=INGEST_FORMATS, default="taobao", help="log format (default: taobao)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="bad rows: stop naming them (fail, default) or skip and count them")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar with rate and time left on a terminal)")


def run(args: argparse.Namespace) -> int:
    report = ingest(events=args.events, out=args.out, fmt=args.fmt, on_error=args.on_error, progress=not args.no_progress and sys.stderr.isatty())
    print(report.summary())
    for example in report.read.examples:
        print(f"  skipped {example}")
    if args.json_out:
        from funnel.tools.output import write_json

        write_json(
            args.json_out,
            {
                "out": report.out, "rows": report.read.rows, "skipped": dict(report.read.skipped), "examples": report.read.examples,
                "bytes_in": report.bytes_in, "bytes_out": report.bytes_out, "row_groups": report.row_groups, "seconds": round(report.seconds, 2),
            },
        )
    print(f"next: funnel train --events {args.out} --format parquet --out BUNDLE")
    return 0
