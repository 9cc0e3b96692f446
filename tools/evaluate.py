"""``funnel evaluate``: full-ranking evaluation of a bundle on the test targets of a split.

Every item in the catalogue competes for every user (items the user interacted with
before the target are masked). Reported: the merged recall candidates in recall-score
order, each recall channel alone, the final ranked list, and two non-learned
baselines (popularity, cosine ItemKNN) under the same protocol.

Single-target splits report HR/NDCG/MRR. The ``comirec`` split holds out a range of
targets per test user: one list is ranked from the history before the first target and
scored with multi-target Recall/HR/NDCG against the distinct target items.
"""

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from events.metrics import summarize, summarize_multi, target_ranks
from events.readers import FORMATS, read_events
from events.sequences import Sequences
from events.split import SPLITS, Split, make_split
from rank.pipeline import TwoStage
from recall.baselines import itemknn_topk, popularity_topk
from recall.retriever import CHANNELS, COVISIT, POPULAR, TWO_TOWER
from server.bundle import load_bundle

log = logging.getLogger("funnel.evaluate")

RECALL_KS = (10, 50, 200)
FINAL_KS = (10, 50)
# ComiRec reports @20 and @50; @10 stays comparable with the leave-last-out tables.
COMIREC_RECALL_KS = (10, 20, 50, 200)
COMIREC_FINAL_KS = (10, 20, 50)
COLUMNS = ("hr@10", "ndcg@10", "mrr@10", "hr@50", "ndcg@50", "hr@200")
COMIREC_COLUMNS = ("recall@20", "ndcg@20", "hr@20", "recall@50", "ndcg@50", "hr@50")


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
        The report: ``users``, ``items``, ``recall``, ``recall_channels``, ``final``,
        ``baselines``; multi-target splits add ``"protocol": "comirec"`` and report
        ``recall@K``, ``hr@K``, ``ndcg@K`` instead of ``hr``/``ndcg``/``mrr``.
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
    users, pos, ends = parts.test_ranges()
    if len(users) == 0:
        raise ValueError(f"{events}: no user has a test target under the {split} split")
    num_items = b.data.items.size
    score, first_target, recall_ks, final_ks = _protocol(parts, seqs, pos, ends)
    k = max(recall_ks)
    merged, final, per_channel = _ranked_lists(pipe, seqs, users, pos, num_items, k, batch, progress)
    history = _pre_test_matrix(seqs, first_target, num_items)
    report = {
        "users": int(len(users)),
        "items": int(num_items - 1),
        "split": split,
        "bundle": {"path": b.path, "model_version": b.model_version, "index_version": b.index_version},
        "recall": score(merged, recall_ks),
        "recall_channels": {CHANNELS[c]: score(top, recall_ks) for c, top in per_channel.items()},
        "final": score(final, final_ks),
        "baselines": {
            "pop": score(popularity_topk(history, history, k, users), recall_ks),
            "itemcf": score(itemknn_topk(history, history, k, users), recall_ks),
        },
    }
    if parts.multi_target:
        report["protocol"] = "comirec"
    report["seconds"] = round(time.time() - started, 1)
    if json_out:
        _write_json(json_out, report)
    return report


def _protocol(parts: Split, seqs: Sequences, pos: np.ndarray, ends: np.ndarray) -> tuple[Callable[[np.ndarray, Sequence[int]], dict], np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """How the split's test targets are scored.

    Returns:
        ``score(topk, ks)`` for the test users' ranked lists, every user's first held-out
        position (-1 if none; the baselines' history stops there), and the cut-offs for the
        recall and the final lists.
    """
    if parts.multi_target:
        targets = _distinct_targets(seqs, pos, ends)
        # Valid and test users are disjoint, so this is each held-out user's first target.
        first_target = np.where(parts.valid_pos >= 0, parts.valid_pos, parts.test_pos)
        return lambda top, ks: summarize_multi(top, targets, ks=ks), first_target, COMIREC_RECALL_KS, COMIREC_FINAL_KS
    single = seqs.items[pos]
    return lambda top, ks: summarize(target_ranks(top, single), ks=ks), parts.test_pos, RECALL_KS, FINAL_KS


def _ranked_lists(pipe: TwoStage, seqs: Sequences, users: np.ndarray, pos: np.ndarray, num_items: int, k: int, batch: int, progress: bool) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Top-``k`` merged recall, final list and each channel alone, from each user's history before ``pos``.

    Returns:
        int64 [U, k] merged candidates, [U, k] final list and {channel: [U, k]}; padding is -1.
    """
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
    return np.concatenate(merged), np.concatenate(final), {c: np.concatenate(top) for c, top in per_channel.items()}


def _distinct_targets(seqs: Sequences, starts: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    """Each user's distinct target items in positions ``starts[i]:ends[i]``."""
    return [np.unique(seqs.items[lo:hi]) for lo, hi in zip(starts, ends)]


def _top(items: np.ndarray, k: int) -> np.ndarray:
    """First ``k`` columns with padding as -1, widened with -1 if the list is shorter."""
    out = np.full((len(items), k), -1, dtype=np.int64)
    w = min(k, items.shape[1])
    out[:, :w] = np.where(items[:, :w] > 0, items[:, :w], -1)
    return out


def _pre_test_matrix(seqs: Sequences, first_target: np.ndarray, num_items: int) -> sp.csr_matrix:
    """[U, M] every user's events before their first held-out target (all events for users without one)."""
    users = np.arange(seqs.num_users)
    ends = np.where(first_target >= 0, first_target, seqs.offsets[1:])
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
    cols = COMIREC_COLUMNS if report.get("protocol") == "comirec" else COLUMNS
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
