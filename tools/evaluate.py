"""``funnel evaluate``: full-ranking evaluation of a bundle on the test targets of a split.

Every item in the catalogue competes for every user (items the user interacted with
before the target are masked). Reported: the merged recall candidates in recall-score
order, each recall channel alone, the final ranked list, and two non-learned
baselines (popularity, cosine ItemKNN) under the same protocol.
"""

import argparse
import json
import logging
import os
import time

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from events.metrics import summarize, target_ranks
from events.readers import FORMATS, read_events
from events.sequences import Sequences
from events.split import SPLITS, make_split
from recall.baselines import itemknn_topk, popularity_topk
from recall.retriever import CHANNELS, COVISIT, POPULAR, TWO_TOWER
from server.bundle import load_bundle

log = logging.getLogger("funnel.evaluate")

RECALL_KS = (10, 50, 200)
FINAL_KS = (10, 50)


def evaluate(
    *,
    bundle: str,
    events: str,
    fmt: str = "taobao",
    split: str = "leave-last-out",
    on_error: str = "fail",
    json_out: str | None = None,
    batch: int = 512,
    progress: bool = True,
) -> dict:
    """Evaluate a bundle on the test targets of ``split`` over ``events``.

    Args:
        bundle: bundle root or version directory.
        events, fmt, on_error: the log (normally the one the bundle was trained on).
        split: must match training so that test targets were never trained on.
        json_out: where to write the JSON report (atomically); None to skip.
        batch: users scored at a time.
        progress: progress bar.

    Returns:
        The report: ``users``, ``items``, ``recall``, ``recall_channels``, ``final``, ``baselines``.
    """
    started = time.time()
    b = load_bundle(bundle)
    pipe = b.pipeline()
    log_ = read_events(events, fmt, on_error=on_error, progress=progress)
    seqs = b.data.encode_log(log_)
    dropped = log_.report.rows - len(seqs)
    if dropped:
        log.warning("%d events name users or items the bundle does not know; they are left out", dropped)
    parts = make_split(seqs, split)
    users, pos = parts.targets("test")
    if len(users) == 0:
        raise ValueError(f"{events}: no user has a test target under the {split} split")
    num_items = b.data.items.size
    k = max(RECALL_KS)

    merged, final = [], []
    per_channel: dict[int, list[np.ndarray]] = {TWO_TOWER: [], COVISIT: [], POPULAR: []}
    for lo in tqdm(range(0, len(users), batch), desc="evaluating", disable=not progress, leave=False):
        u, p = users[lo : lo + batch], pos[lo : lo + batch]
        window = seqs.window(p, pipe.history, seqs.offsets[u])
        exclude = seqs.history_matrix(u, p, num_items)
        cands, ranked = pipe.recommend(window, seqs.ts[p], p - seqs.offsets[u], exclude)
        merged.append(_top(cands.items, k))
        final.append(_top(ranked.items, k))
        recall_window = window.tail(pipe.retriever.model.cfg.history)
        for channel, out in per_channel.items():
            out.append(_top(pipe.retriever.retrieve(recall_window, seqs.ts[p], exclude, channels=(channel,)).items, k))

    targets = seqs.items[pos]
    score = lambda top, ks: summarize(target_ranks(np.concatenate(top), targets), ks=ks)
    history = _pre_test_matrix(seqs, parts.test_pos, num_items)
    report = {
        "users": int(len(users)),
        "items": int(num_items - 1),
        "split": split,
        "bundle": {"path": b.path, "model_version": b.model_version, "index_version": b.index_version},
        "recall": score(merged, RECALL_KS),
        "recall_channels": {CHANNELS[c]: score(top, RECALL_KS) for c, top in per_channel.items()},
        "final": score(final, FINAL_KS),
        "baselines": {
            "pop": summarize(target_ranks(popularity_topk(history, history, k, users), targets), ks=RECALL_KS),
            "itemcf": summarize(target_ranks(itemknn_topk(history, history, k, users), targets), ks=RECALL_KS),
        },
    }
    report["seconds"] = round(time.time() - started, 1)
    if json_out:
        _write_json(json_out, report)
    return report


def _top(items: np.ndarray, k: int) -> np.ndarray:
    """First ``k`` columns with padding as -1, widened with -1 if the list is shorter."""
    out = np.full((len(items), k), -1, dtype=np.int64)
    w = min(k, items.shape[1])
    out[:, :w] = np.where(items[:, :w] > 0, items[:, :w], -1)
    return out


def _pre_test_matrix(seqs: Sequences, test_pos: np.ndarray, num_items: int) -> sp.csr_matrix:
    """[U, M] every user's events before their test target (all events for users without one)."""
    users = np.arange(seqs.num_users)
    ends = np.where(test_pos >= 0, test_pos, seqs.offsets[1:])
    return seqs.history_matrix(users, ends, num_items)


def _write_json(path: str, report: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmp, path)


def format_report(report: dict) -> str:
    """A readable table: one row per method, one column per metric."""
    rows = [("recall (merged)", report["recall"])]
    rows += [(f"  {name}", m) for name, m in report["recall_channels"].items()]
    rows += [("final (ranked)", report["final"])]
    rows += [(f"baseline {name}", m) for name, m in report["baselines"].items()]
    cols = ["hr@10", "ndcg@10", "mrr@10", "hr@50", "ndcg@50", "hr@200"]
    lines = [f"{report['users']:,} users, {report['items']:,} items, split {report['split']}", f"{'':18}" + "".join(f"{c:>10}" for c in cols)]
    for name, m in rows:
        lines.append(f"{name:18}" + "".join(f"{m[c]:>10.4f}" if c in m else f"{'-':>10}" for c in cols))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle root (with CURRENT) or a version directory")
    parser.add_argument("--events", required=True, help="the behaviour log to evaluate on (normally the training log)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="taobao", help="log format (default: taobao)")
    parser.add_argument("--split", choices=SPLITS, default="leave-last-out", help="must match the split used in training (default: leave-last-out)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="bad rows: stop (fail, default) or skip")
    parser.add_argument("--json", dest="json_out", default=None, help="write the report as JSON to this path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    report = evaluate(
        bundle=args.bundle, events=args.events, fmt=args.fmt, split=args.split, on_error=args.on_error,
        json_out=args.json_out, progress=not args.no_progress,
    )
    print(format_report(report))
    return 0
