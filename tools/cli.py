"""The ``funnel`` command: a thin argparse layer over the tools' keyword-argument functions."""

import argparse
import logging
import sys

from funnel.bundle import BundleError
from funnel.events.readers import EventFormatError
from funnel.recall.retriever import RecallConfig
from funnel.tools.plugins import PluginError, load_plugins

COMMANDS = {
    "demo": ("funnel.tools.demo", "generate data, train, serve and query once: the quickstart"),
    "synth": ("funnel.events.synth", "write a synthetic Taobao-format behaviour log with planted structure"),
    "ingest": ("funnel.tools.ingest", "parse and check a behaviour log once into parquet, for train and evaluate"),
    "train": ("funnel.tools.train", "train both stages on a behaviour log and publish a bundle"),
    "evaluate": ("funnel.tools.evaluate", "full-ranking evaluation of a bundle (recall, channels, final, baselines)"),
    "seeds": ("funnel.tools.seeds", "train and evaluate once per seed; mean and spread of every metric"),
    "learn": ("funnel.tools.learn", "keep learning from logged events: warm-start cycles, gated, published as new versions"),
    "rebuild-index": ("funnel.tools.rebuild_index", "rebuild a bundle's FAISS index with another spec, verify its recall, swap it in"),
    "verify": ("funnel.tools.verify", "check a bundle's files against its manifest (presence, size, SHA-256)"),
    "serve": ("funnel.tools.serve", "serve a bundle over gRPC (funnel.v1.Recommender)"),
    "recommend": ("funnel.tools.recommend", "call a running server's Recommend and print the ranked items"),
    "loadtest": ("funnel.tools.loadtest", "open-loop load on a running server: latency percentiles, errors, model versions, health-check floor"),
}


def add_candidates_argument(parser: argparse.ArgumentParser, effect: str, flag: str = "--candidates") -> None:
    """``--candidates FIELD=COUNT,...`` (or ``flag``): per-channel candidate counts replacing the bundle's (parsed to a dict, ``None`` when absent)."""

    def counts(spec: str) -> dict[str, int]:
        try:
            return RecallConfig.parse_counts(spec)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    parser.add_argument(
        flag, type=counts, default=None, metavar="FIELD=COUNT,...",
        help="recall candidates per channel instead of the bundle's, e.g. two_tower=150,covisit=50,popular=20 "
        f"(recent=N: the latest events co-visitation starts from); {effect} (default: the bundle's)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="funnel",
        description="Funnel: a two-stage recommender. Behaviour log in, ranked items out of one gRPC call.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-json", action="store_true", help="log one JSON object per line, with structured fields such as request_id, method and code"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = __import__(module, fromlist=["add_arguments"])
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``funnel`` console script."""
    try:
        load_plugins()  # before parsing: --candidates accepts the plugins' channel names
    except PluginError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line as given (train --nproc re-runs it under torchrun)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("faiss.loader", "onnxscript", "onnx_ir"):  # library INFO lines (per-node ONNX export notes) drown ours
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.log_json:
        from funnel.server.logs import use_json_logs

        use_json_logs()
    try:
        return args.run(args)
    except (EventFormatError, BundleError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
