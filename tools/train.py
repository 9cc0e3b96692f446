"""``funnel train``: behaviour log → trained two-tower, index, channels and ranker → bundle."""

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import resource
import subprocess
import sys
import time

import faiss
import numpy as np

from funnel.bundle import write_version
from funnel.events.dataset import Dataset, file_fingerprint
from funnel.events.eventlog import fold_events as fold_events_into
from funnel.events.eventlog import read_event_store_since
from funnel.events.readers import FORMATS, read_events, read_items, release_read_memory
from funnel.events.split import SPLITS, make_split
from funnel.rank.business import BusinessTables
from funnel.rank.schema import fit_feature_tables
from funnel.rank.train import RankerTrainConfig, train_ranker
from funnel.recall import distributed
from funnel.recall.index import AUTO_IVF_MIN_ITEMS, MIN_GATE_RECALL, IndexSpec, build_index, resolve, tune_nprobe
from funnel.recall.plugin import fit_channels
from funnel.recall.retriever import RecallConfig, Retriever
from funnel.recall.train import TwoTowerTrainConfig, item_vectors, known_items, recommendable_items, serving_user_vectors, train_two_tower

log = logging.getLogger("funnel.train")

AUTO_INDEX = "auto"
TWO_TOWER_SHARE = 0.55
"""Share of ``train(budget=...)`` given to two-tower training."""
WRITE_SHARE = 0.05
"""Share of the budget kept for exporting and writing the bundle; the ranker gets the rest."""
MIN_RANKER_SHARE = 0.1
"""The ranker's least share, even when the stages before it overran."""
GATE_USERS = 1000
"""Users whose vectors check an automatically chosen IVF index against exact search."""
GATE_K = 200
"""Depth of that check: the two-tower channel's candidate count."""


def train(
    *,
    events: str,
    out: str,
    fmt: str = "taobao",
    items: str | None = None,
    fold_events: str | None = None,
    split: str = "leave-last-out",
    on_error: str = "fail",
    index: str = "auto",
    seed: int = 0,
    two_tower: TwoTowerTrainConfig | None = None,
    ranker: RankerTrainConfig | None = None,
    recall: RecallConfig | None = None,
    budget: float | None = None,
    progress: bool = True,
) -> str:
    """Train the whole pipeline and publish a new bundle version.

    Only training positions and the validation target are used; the test target of
    the split is never read, so ``funnel evaluate`` on the same log is honest.

    Args:
        events: the behaviour log (see ``fmt``).
        out: bundle root; the new version goes to ``out/versions/<v>`` and ``out/CURRENT`` flips to it.
        fmt: ``taobao``, ``movielens`` or ``parquet``.
        items: optional catalogue CSV (``item_id,category_id[,title][,tags]``); its items
            are recommendable even with no interactions (vectors from side features).
        fold_events: optional event store written by ``funnel serve`` (``--event-log``);
            its events are appended to ``events``, so logged users and items are learned.
        split: ``leave-last-out``, ``time`` or ``comirec`` (held-out users; see
            :func:`events.split.comirec_split`).
        on_error: ``fail`` or ``skip`` for bad rows.
        index: index spec string, e.g. ``flat`` or ``ivf:nlist=1024,nprobe=32``; ``auto``
            (default): exact search below :data:`recall.index.AUTO_IVF_MIN_ITEMS`
            recommendable items, above it an IVF index sized to the catalogue if it reaches
            :data:`recall.index.MIN_GATE_RECALL` recall@200 against exact search on real
            user vectors (else exact search).
        seed: seed for both models (overrides the configs' seeds).
        two_tower, ranker, recall: stage settings (defaults when omitted).
        budget: seconds for the whole run. Two-tower training (its preparation included)
            gets :data:`TWO_TOWER_SHARE`; the ranker gets whatever the stages before it
            left, less :data:`WRITE_SHARE` for writing (at least :data:`MIN_RANKER_SHARE`).
            Each loop's epochs are cut to validate several times within its share.
        progress: progress bars and per-epoch lines.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains its shard of each epoch
    with DistributedDataParallel (:mod:`recall.distributed`) and rank 0 alone writes.

    Returns:
        The new version directory ("" on ranks other than 0).
    """
    started = time.time()
    world = distributed.init_from_env()
    if index != AUTO_INDEX:
        IndexSpec.parse(index)  # a bad spec fails before hours of training
    stage = Stages()
    with stage("read"):
        log_ = read_events(events, fmt, on_error=on_error, progress=progress)
        log.info("%s: %s", events, log_.report.summary())
        base_rows = log_.report.rows
        folded_seq = 0
        if fold_events:
            logged, folded_seq = read_event_store_since(fold_events)
            log_ = fold_events_into(log_, logged)
            log.info("%s: folded in %d logged events", fold_events, log_.report.rows - base_rows)
    with stage("dataset"):
        data = Dataset.from_log(log_, read_items(items) if items else None)
        rows, skipped = log_.report.rows, dict(log_.report.skipped)
        del log_  # the encoded sequences replace the raw log (several GB at 100M events)
        release_read_memory()
        parts = make_split(data.seqs, split)
    tt_cfg = dataclasses.replace(two_tower or TwoTowerTrainConfig(), seed=seed)
    rk_cfg = dataclasses.replace(ranker or RankerTrainConfig(), seed=seed)
    if budget:
        tt_cfg = dataclasses.replace(tt_cfg, max_seconds=budget * TWO_TOWER_SHARE)
    recall_cfg = recall or RecallConfig()

    with stage("two_tower"):
        model, tt_history = train_two_tower(data, parts, train_config=tt_cfg, progress=progress)
    with stage("index"):
        known = known_items(data, parts)
        vecs = item_vectors(model, data, known)
        recommendable = recommendable_items(data, known)
        ids = np.flatnonzero(recommendable)
        spec, index_gate, ann = choose_index(index, model, data, parts, vecs, recommendable, seed)
        if ann is None:
            ann = build_index(vecs[ids], ids, spec)
    # Channels and popularity see only the training part, like the models.
    mask = parts.train_mask(data.seqs)
    with stage("channels"):
        channels = fit_channels(data, mask)
        retriever = Retriever(model, vecs, ann, channels, data.item_category, recall_cfg, recommendable)
    with stage("business"):
        business = BusinessTables.fit(data.seqs, mask, data.item_category)
        fitted = fit_feature_tables(data, mask)
    if budget:
        left = budget * (1 - WRITE_SHARE) - (time.time() - started)
        rk_cfg = dataclasses.replace(rk_cfg, max_seconds=max(left, budget * MIN_RANKER_SHARE))
    with stage("ranker"):
        rank_model, rk_history = train_ranker(data, parts, retriever, retriever.channel("popular").counts, business, fitted=fitted, train_config=rk_cfg, progress=progress)

    if not world.main:
        log.info("rank %d of %d: training done; rank 0 writes the bundle", world.rank, world.size)
        return ""
    info = {
        "data": {
            "source": events,
            "format": fmt,
            "fingerprint": file_fingerprint(events),
            "items_file": items,
            "rows": rows,
            "folded_events": {"source": fold_events, "rows": rows - base_rows} if fold_events else None,
            "skipped_rows": skipped,
            "split": split,
        },
        "training": {
            "two_tower": tt_history,
            "ranker": rk_history,
            "seconds": round(time.time() - started, 1),
            "budget_seconds": budget,
            "stages": stage.report,
            "processes": world.size,
        },
        "index_choice": index_gate,
        # Where `funnel learn` takes over: the events after this one are not in the bundle yet.
        "learning": {"event_log": os.path.abspath(fold_events), "event_seq": folded_seq} if fold_events else None,
    }
    version = write_version(
        out,
        data=data,
        two_tower=model,
        ranker=rank_model,
        item_vecs=vecs,
        index=ann,
        index_spec=spec,
        channels=channels,
        recall_config=retriever.config,
        business=business,
        fitted=fitted,
        info=info,
    )
    log.info("bundle written to %s in %.0f s", version, time.time() - started)
    return version


class Stages:
    """Times each training stage and logs its seconds and memory: ``with stages("ranker"): ...``.

    ``report`` maps stage name -> seconds, resident memory after it and the process's peak so far (GB).
    """

    def __init__(self):
        self.report: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.report[name] = {"seconds": round(seconds, 1), "rss_gb": round(_rss_gb(), 2), "peak_rss_gb": round(_peak_rss_gb(), 2)}
        log.info("stage %s: %.1f s, RSS %.2f GB (peak so far %.2f GB)", name, seconds, self.report[name]["rss_gb"], self.report[name]["peak_rss_gb"])


def _rss_gb() -> float:
    """This process's resident memory now (Linux; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return _peak_rss_gb()


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def parse_duration(text: str) -> float:
    """Seconds from ``"90s"``, ``"45m"``, ``"1.5h"`` or a bare number of seconds.

    Raises:
        ValueError: naming the text and the accepted forms.
    """
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{text!r}: expected a positive duration such as 90s, 45m or 1.5h")
    return seconds


def choose_index(
    index: str, model, data: Dataset, parts, vecs: np.ndarray, recommendable: np.ndarray, seed: int
) -> tuple[IndexSpec, dict | None, faiss.Index | None]:
    """The index spec to build: ``index`` as given, or for ``auto`` exact search or a gated IVF (see :func:`train`).

    Returns:
        The spec; for ``auto``, what decided it (items, candidate specs, measured recall);
        and the IVF index when it passed the gate (already built and configured), else ``None``.
    """
    if index != AUTO_INDEX:
        return IndexSpec.parse(index), None, None
    n = int(recommendable.sum())
    if n < AUTO_IVF_MIN_ITEMS:
        return IndexSpec(), {"items": n, "chosen": "flat", "reason": f"fewer than {AUTO_IVF_MIN_ITEMS} items: exact search is cheap"}, None
    # Real queries: sampled users as the server will ask for them (recall.train.serving_user_vectors).
    users, _ = parts.targets("valid")
    if not len(users):
        return IndexSpec(), {"items": n, "chosen": "flat", "reason": "no validation users to check an approximate index against"}, None
    candidate = resolve(IndexSpec(kind="ivf"), n)
    ids = np.flatnonzero(recommendable)
    ivf = build_index(vecs[ids], ids, candidate)
    pick = np.random.default_rng(seed).choice(len(users), min(GATE_USERS, len(users)), replace=False)
    queries = serving_user_vectors(model, data, users[pick])
    k = min(GATE_K, n)
    candidate, tried = tune_nprobe(ivf, candidate, queries, vecs, recommendable, k, MIN_GATE_RECALL)
    recall = tried[str(candidate)]
    passed = recall >= MIN_GATE_RECALL
    chosen = candidate if passed else IndexSpec()
    log.info("index auto: %d items; recall@%d against exact search on %d users: %s -> %s", n, k, len(queries), tried, chosen)
    return chosen, {"items": n, "recall_at_k": tried, "k": k, "users": len(queries), "chosen": str(chosen)}, ivf if passed else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", required=True, help="behaviour log: a Taobao CSV, a MovieLens directory or a parquet file")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="taobao", help="log format (default: taobao)")
    parser.add_argument("--items", default=None, help="optional catalogue CSV with header item_id,category_id[,title][,tags]: items recommendable before their first interaction")
    parser.add_argument("--fold-events", default=None, metavar="PATH", help="event store written by 'funnel serve' (its --event-log): append its logged events to the training log")
    parser.add_argument("--split", choices=SPLITS, default="leave-last-out", help="how to hold out validation/test targets (default: leave-last-out)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="bad rows: stop with file:line (fail, default) or skip and count them")
    parser.add_argument("--out", required=True, help="bundle root; a new version is written under OUT/versions and OUT/CURRENT flips to it")
    parser.add_argument(
        "--index", default=AUTO_INDEX,
        help="index spec: auto | flat | ivf:nlist=N,nprobe=P[,codes=f16|f32|sq8] | ivfpq:nlist=N,m=M,nprobe=P | hnsw:m=M,ef_search=E; auto: exact search "
        f"below {AUTO_IVF_MIN_ITEMS:,} items, above it an IVF index sized to the catalogue (vectors stored as 16-bit floats) if its recall@{GATE_K} against exact search "
        f"on real user vectors reaches {MIN_GATE_RECALL} (else exact search) (default: auto)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for both models (default: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs per model (early stopping usually ends sooner)")
    parser.add_argument(
        "--budget", type=duration_arg, default=None, metavar="DURATION",
        help=f"time for the whole run, e.g. 60m or 2h: two-tower training gets {TWO_TOWER_SHARE * 100:.0f}%%, the ranker what reading, "
        f"the index, channels and tables left of the rest less {WRITE_SHARE * 100:.0f}%% for writing; each is cut into epochs that are "
        "validated (early stopping as usual) (default: no budget, train to early stopping)",
    )
    parser.add_argument(
        "--samples-per-epoch", type=_positive_int, default=None, metavar="N",
        help="two-tower training positions drawn per epoch (default: every position; a 100M-event log needs far fewer)",
    )
    parser.add_argument(
        "--nproc", type=_positive_int, default=1, metavar="N",
        help="train with N processes on this machine: runs 'torchrun --standalone --nproc-per-node N -m funnel.tools train ...' with the other "
        "arguments (DistributedDataParallel, gloo on CPU; one thread per process unless OMP_NUM_THREADS is set). Across machines, call "
        "torchrun yourself (see the README) (default: 1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (they are off anyway when stderr is not a terminal; one log line per epoch stays)")


def duration_arg(text: str) -> float:
    """argparse type for a duration (:func:`parse_duration`): seconds, or a usage error naming the text."""
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number above 0")
    return int(text)


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command that runs the ``funnel`` command line ``argv`` (``train`` and its arguments) in ``nproc`` processes, ``--nproc`` left out."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "funnel.tools", *rest]


def run(args: argparse.Namespace) -> int:
    if args.nproc > 1 and not distributed.init_from_env().distributed:
        return subprocess.run(torchrun_command(args.argv, args.nproc), check=False).returncode
    tt, rk = TwoTowerTrainConfig(), RankerTrainConfig()
    if args.epochs is not None:
        tt, rk = dataclasses.replace(tt, epochs=args.epochs), dataclasses.replace(rk, epochs=args.epochs)
    if args.samples_per_epoch is not None:
        tt = dataclasses.replace(tt, samples_per_epoch=args.samples_per_epoch)
    world = distributed.init_from_env()
    if not world.main:  # one log and one progress bar: rank 0's
        logging.getLogger("funnel").setLevel(logging.WARNING)
    try:
        version = train(
            events=args.events, out=args.out, fmt=args.fmt, items=args.items, fold_events=args.fold_events, split=args.split, on_error=args.on_error, index=args.index,
            seed=args.seed, two_tower=tt, ranker=rk, budget=args.budget, progress=world.main and not args.no_progress and sys.stderr.isatty(),
        )
    finally:
        distributed.shutdown()
    if world.main:
        print(json.dumps({"bundle": version}))
    return 0
