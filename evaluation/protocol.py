"""Full-ranking evaluation of a bundle on the test targets of a split (``funnel evaluate`` and ``funnel seeds`` are CLIs over it).

Every item in the catalogue competes for every user (items the user interacted with
before the target are masked). Reported: the merged recall candidates in recall-score
order, each recall channel alone (the two-tower searched to the deepest K reported,
the others at their configured counts), the final ranked list, and two non-learned
baselines (popularity, cosine ItemKNN) under the same protocol.

Single-target splits report HR/NDCG/MRR. The ``comirec`` split holds out a range of
targets per test user: one list is ranked from the history before the first target and
scored with multi-target Recall/HR/NDCG against the distinct target items.

The ranker is also judged as a classifier on held-out pairs: for every test user whose
target the recall stage found, the target is the positive and every other candidate a
negative (the same kind of group the ranker trained on). Reported: AUC, GAUC (per-user
AUC weighted by the user's pair count), logloss and calibration, per-head AUC where the
ranker has several heads, and the lift table (recall order vs ranked order of the same
candidates). The metric-vs-K curves feed the HTML report (:mod:`evaluation.report`).
"""

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from funnel.bundle import load_bundle
from funnel.evaluation.baselines import itemknn_topk, popularity_topk
from funnel.evaluation.metrics import (
    auc,
    calibration_bins,
    expected_calibration_error,
    gauc,
    logloss,
    multi_target_curves,
    rank_curves,
    summarize,
    summarize_multi,
    target_ranks,
)
from funnel.events.readers import read_events, release_read_memory
from funnel.events.schema import BEHAVIOR_CODE, BEHAVIORS
from funnel.events.sequences import Sequences
from funnel.events.split import Split, make_split, subsample
from funnel.rank.model import HEAD_BEHAVIORS
from funnel.rank.pipeline import TwoStage
from funnel.recall.retriever import TWO_TOWER

log = logging.getLogger("funnel.evaluate")

RECALL_KS = (10, 50, 200)
FINAL_KS = (10, 50)
# ComiRec reports @20 and @50; @10 stays comparable with the leave-last-out tables.
COMIREC_RECALL_KS = (10, 20, 50, 200)
COMIREC_FINAL_KS = (10, 20, 50)
COLUMNS = ("hr@10", "ndcg@10", "mrr@10", "hr@50", "ndcg@50", "hr@200")
COMIREC_COLUMNS = ("recall@20", "ndcg@20", "hr@20", "recall@50", "ndcg@50", "hr@50")
LIFT_KEYS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50")
CALIBRATION_BINS = 10


def evaluate_bundle(
    *,
    bundle: str,
    events: str,
    fmt: str = "taobao",
    split: str = "leave-last-out",
    on_error: str = "fail",
    batch: int = 512,
    progress: bool = True,
    candidates: dict[str, int] | None = None,
    runtime: str = "onnx",
    max_users: int = 0,
    seed: int = 0,
    curves: bool = False,
) -> tuple[dict, dict[str, dict[str, np.ndarray]] | None]:
    """Evaluate a bundle on the test targets of ``split`` over ``events``.

    Args:
        bundle: bundle root or version directory.
        events, fmt, on_error: the log (normally the one the bundle was trained on).
        split: must match training so that test targets were never trained on.
        batch: users scored at a time.
        progress: progress bar.
        candidates: per-channel candidate counts replacing the bundle's
            (:meth:`recall.retriever.RecallConfig.parse_counts`), to measure what
            serving with them (``funnel serve --candidates``) costs in quality.
        runtime: ``onnx`` scores with ONNX Runtime, as the server does; ``torch`` with
            the frozen PyTorch models (:meth:`bundle.Bundle.pipeline`).
        max_users: score a fixed random sample of this many test users (0: all); the
            same ``seed`` draws the same users, so bundles compare on one sample.
        seed: the sample's seed.
        curves: also return each method's HR and NDCG at every cut-off (for the HTML report).

    Returns:
        The report, and the curves (None unless asked): ``{method: {"hr": [K], "ndcg": [K]}}``.
        The report has ``users``, ``items``, ``candidates`` (the recall counts used),
        ``recall``, ``recall_channels``, ``final``, ``baselines``, ``ranker`` (classifier
        metrics on held-out pairs, see :func:`_ranker_report`) and ``lift`` (recall order
        vs ranked order of the same candidates); multi-target splits add
        ``"protocol": "comirec"`` and report ``recall@K``, ``hr@K``, ``ndcg@K`` instead
        of ``hr``/``ndcg``/``mrr``.
    """
    started = time.time()
    b = load_bundle(bundle, candidates=candidates)
    pipe = b.pipeline(runtime)
    log_ = read_events(events, fmt, on_error=on_error, progress=progress)
    seqs = b.data.encode_log(log_)
    dropped = log_.report.rows - len(seqs)
    del log_  # the encoded sequences replace it (GBs at 100M events)
    release_read_memory()
    if dropped:
        log.warning("%d events name users or items the bundle does not know; they are left out", dropped)
    parts = make_split(seqs, split)
    users, pos, ends = parts.test_ranges()
    if len(users) == 0:
        raise ValueError(f"{events}: no user has a test target under the {split} split")
    test_users = len(users)
    if max_users:
        users, pos, ends = subsample(np.random.default_rng(seed), max_users, users, pos, ends)
    num_items = b.data.items.size
    proto = _protocol(parts, seqs, pos, ends)
    k = max(proto.recall_ks)
    lists = _ranked_lists(pipe, seqs, users, pos, ends, num_items, k, batch, progress)
    history = _pre_test_matrix(seqs, proto.first_target, num_items)
    knn_train, knn_depth = _itemknn_matrix(seqs, proto.first_target, num_items)
    baselines = {"pop": popularity_topk(history, history, k, users), "itemcf": itemknn_topk(history, knn_train, k, users)}
    report = {
        "users": int(len(users)),
        "test_users": int(test_users),
        "items": int(num_items - 1),
        "split": split,
        "bundle": {"path": b.path, "model_version": b.model_version, "index_version": b.index_version},
        "candidates": b.recall_config.to_dict(),
        "runtime": runtime,
        "recall": proto.score(lists.merged, proto.recall_ks),
        "recall_channels": {name: proto.score(top, proto.recall_ks) for name, top in lists.per_channel.items()},
        "final": proto.score(lists.final, proto.final_ks),
        "baselines": {name: proto.score(top, proto.recall_ks) for name, top in baselines.items()},
        "itemcf_history": knn_depth,
    }
    report["lift"] = _lift(report["recall"], report["final"])
    report["ranker"] = _ranker_report(lists.pairs, len(users))
    report["warnings"] = sample_warnings(len(users), report["final"])
    if parts.multi_target:
        report["protocol"] = "comirec"
    report["seconds"] = round(time.time() - started, 1)
    if not curves:
        return report, None
    lists_by_method = {"recall (merged)": lists.merged, "final (ranked)": lists.final, **{f"baseline {n}": top for n, top in baselines.items()}}
    return report, {name: proto.curves(top, k) for name, top in lists_by_method.items()}


@dataclass
class _Protocol:
    """How a split's test targets are scored.

    Attributes:
        score: ``score(topk, ks)`` → metrics dict for the test users' ranked lists.
        curves: ``curves(topk, max_k)`` → ``{"hr": [max_k], "ndcg": [max_k]}`` for K = 1..max_k.
        first_target: every user's first held-out position (-1 if none; the baselines' history stops there).
        recall_ks, final_ks: cut-offs for the recall and the final lists.
    """

    score: Callable[[np.ndarray, Sequence[int]], dict]
    curves: Callable[[np.ndarray, int], dict[str, np.ndarray]]
    first_target: np.ndarray
    recall_ks: tuple[int, ...]
    final_ks: tuple[int, ...]


def _protocol(parts: Split, seqs: Sequences, pos: np.ndarray, ends: np.ndarray) -> _Protocol:
    """The scoring protocol of ``parts`` for test users with targets at ``pos:ends``."""
    if parts.multi_target:
        targets = _distinct_targets(seqs, pos, ends)
        # Valid and test users are disjoint, so this is each held-out user's first target.
        first_target = np.where(parts.valid_pos >= 0, parts.valid_pos, parts.test_pos)

        def multi_curves(top: np.ndarray, max_k: int) -> dict[str, np.ndarray]:
            c = multi_target_curves(top, targets, max_k)
            return {"hr": c["hr"], "ndcg": c["ndcg"]}

        return _Protocol(lambda top, ks: summarize_multi(top, targets, ks=ks), multi_curves, first_target, COMIREC_RECALL_KS, COMIREC_FINAL_KS)
    single = seqs.items[pos]

    def single_curves(top: np.ndarray, max_k: int) -> dict[str, np.ndarray]:
        hr, nd = rank_curves(target_ranks(top, single), max_k)
        return {"hr": hr, "ndcg": nd}

    return _Protocol(lambda top, ks: summarize(target_ranks(top, single), ks=ks), single_curves, parts.test_pos, RECALL_KS, FINAL_KS)


@dataclass
class _Pairs:
    """The ranker's held-out pairs, flat over (user, candidate) for users whose target was recalled.

    Attributes:
        groups: int64 [N] test-user index of each pair.
        labels: bool [N] the candidate is one of the user's targets.
        scores: float32 [N] the final ranking score.
        heads: {head: float32 [N]} per-head probabilities.
        head_labels: {head: bool [N]} the candidate is a target held out with one of the head's behaviours.
    """

    groups: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    heads: dict[str, np.ndarray]
    head_labels: dict[str, np.ndarray]


@dataclass
class _Lists:
    """Every test user's top-``k`` lists (int64 [U, k], padding -1) and the ranker's held-out pairs."""

    merged: np.ndarray
    final: np.ndarray
    per_channel: dict[str, np.ndarray]
    pairs: _Pairs


def _ranked_lists(pipe: TwoStage, seqs: Sequences, users: np.ndarray, pos: np.ndarray, ends: np.ndarray, num_items: int, k: int, batch: int, progress: bool) -> _Lists:
    """Top-``k`` merged recall, final list and each channel alone, from each user's history before ``pos``, plus the held-out pairs."""
    merged, final, pairs = [], [], []
    per_channel: dict[str, list[np.ndarray]] = {name: [] for name in pipe.retriever.channel_names[1:]}
    for lo in tqdm(range(0, len(users), batch), desc="evaluating", disable=not progress, leave=False):
        u, p, e = users[lo : lo + batch], pos[lo : lo + batch], ends[lo : lo + batch]
        window = seqs.window(p, pipe.history, seqs.offsets[u])
        exclude = seqs.history_matrix(u, p, num_items)
        out = pipe.recommend(window, seqs.ts[p], p - seqs.offsets[u], exclude)
        merged.append(_top(out.candidates.items, k))
        final.append(_top(out.ranked.items, k))
        pairs.append(_batch_pairs(out.ranked, seqs, p, e, num_items, lo))
        recall_window = window.tail(pipe.retriever.model.cfg.history)
        for channel, out in per_channel.items():
            # The two-tower alone is searched to the deepest K reported, whatever the serving count, so its
            # HR@200 measures the model; the other channels return what they are configured to.
            deep = k if channel == TWO_TOWER else 0
            out.append(_top(pipe.retriever.retrieve(recall_window, seqs.ts[p], exclude, channels=(channel,), two_tower=deep).items, k))
    heads = pairs[0].heads.keys()
    all_pairs = _Pairs(
        groups=np.concatenate([q.groups for q in pairs]),
        labels=np.concatenate([q.labels for q in pairs]),
        scores=np.concatenate([q.scores for q in pairs]),
        heads={h: np.concatenate([q.heads[h] for q in pairs]) for h in heads},
        head_labels={h: np.concatenate([q.head_labels[h] for q in pairs]) for h in heads},
    )
    return _Lists(np.concatenate(merged), np.concatenate(final), {c: np.concatenate(top) for c, top in per_channel.items()}, all_pairs)


def _batch_pairs(ranked, seqs: Sequences, starts: np.ndarray, ends: np.ndarray, num_items: int, offset: int) -> _Pairs:
    """Held-out pairs of one batch: users whose target is among their candidates, every real candidate of theirs.

    Args:
        ranked: the batch's :class:`rank.pipeline.Ranked`.
        seqs: the encoded log.
        starts, ends: [b] each user's target range.
        num_items: item id space size.
        offset: test-user index of the batch's first user.
    """
    labels = _is_target(ranked.items, _distinct_targets(seqs, starts, ends), num_items)  # [b, C]
    keep = (ranked.items > 0) & labels.any(axis=1, keepdims=True)
    rows = np.nonzero(keep)[0]
    head_labels = {}
    for head in ranked.head_scores:
        wanted = [BEHAVIOR_CODE[name] for name in HEAD_BEHAVIORS.get(head, BEHAVIORS)]
        head_labels[head] = _is_target(ranked.items, _distinct_targets(seqs, starts, ends, wanted), num_items)[keep]
    return _Pairs(
        groups=(offset + rows).astype(np.int64),
        labels=labels[keep],
        scores=ranked.scores[keep].astype(np.float32),
        heads={h: s[keep].astype(np.float32) for h, s in ranked.head_scores.items()},
        head_labels=head_labels,
    )


def _is_target(items: np.ndarray, targets: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """bool [B, C]: ``items[b, c]`` is one of ``targets[b]`` (padding never is)."""
    sizes = np.fromiter((len(t) for t in targets), dtype=np.int64, count=len(targets))
    flat = np.concatenate(targets) if len(targets) else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(targets)), sizes)
    # Folding the row into the key turns per-row membership into one np.isin call.
    rows = np.arange(len(items))[:, None]
    return np.isin(rows * num_items + items, owner * num_items + flat) & (items > 0)


def _ranker_report(pairs: _Pairs, n_users: int) -> dict:
    """Classifier metrics of the ranker on the held-out pairs.

    AUC and GAUC use the final ranking score (what orders the list); logloss and
    calibration use the ``click`` head, the probability whose label is "interacted next"
    (the final score mixes in the cart/fav and buy heads, which predict rarer events).

    Returns:
        ``pairs``, ``users`` (with their target recalled), ``recalled_share`` (of test
        users), ``auc``, ``gauc``, ``logloss``, ``ece`` (10 equal-width bins),
        ``calibration`` (10 equal-count bins: ``mean_prob``, ``positive_rate``, ``count``) and, with several heads, ``heads``
        ({name: {"auc", "positives"}}: the head's probability over the same pairs, a pair
        being positive when its candidate is a target held out with one of the head's
        behaviours (:data:`rank.model.HEAD_BEHAVIORS`); auc is None when a head has no positive).
    """
    users = len(np.unique(pairs.groups))
    out: dict = {"pairs": int(len(pairs.labels)), "users": users, "recalled_share": round(users / max(n_users, 1), 6)}
    if not users:
        return out
    prob = pairs.heads["click"]
    # Equal-count bins: the predictions crowd the low end, where equal-width bins would give two or three points.
    mean_prob, rate, counts = calibration_bins(pairs.labels, prob, CALIBRATION_BINS, strategy="quantile")
    out.update(
        auc=round(auc(pairs.labels, pairs.scores), 6),
        gauc=round(gauc(pairs.groups, pairs.labels, pairs.scores), 6),
        logloss=round(logloss(pairs.labels, prob), 6),
        ece=round(expected_calibration_error(pairs.labels, prob, CALIBRATION_BINS), 6),
        calibration={
            "mean_prob": [_finite(v) for v in mean_prob],
            "positive_rate": [_finite(v) for v in rate],
            "count": counts.tolist(),
        },
    )
    if len(pairs.heads) > 1:
        out["heads"] = {
            head: {
                "auc": round(auc(pairs.head_labels[head], probs), 6) if 0 < pairs.head_labels[head].sum() < len(probs) else None,
                "positives": int(pairs.head_labels[head].sum()),
            }
            for head, probs in pairs.heads.items()
        }
    return out


def _finite(value: float) -> float | None:
    """Rounded float, None for nan (JSON has no nan)."""
    return round(float(value), 6) if np.isfinite(value) else None


def _lift(recall: dict, final: dict) -> dict:
    """Recall order vs ranked order of the same candidates at the lift cut-offs, and the NDCG@10 ratio final/recall."""
    ratio = final["ndcg@10"] / recall["ndcg@10"] if recall["ndcg@10"] > 0 else None
    return {
        "recall": {key: recall[key] for key in LIFT_KEYS},
        "final": {key: final[key] for key in LIFT_KEYS},
        "ndcg@10_ratio": round(ratio, 4) if ratio is not None else None,
    }


def _distinct_targets(seqs: Sequences, starts: np.ndarray, ends: np.ndarray, behaviors: Sequence[int] | None = None) -> list[np.ndarray]:
    """Each user's distinct target items in positions ``starts[i]:ends[i]``, optionally only events with one of ``behaviors``."""
    if behaviors is None:
        return [np.unique(seqs.items[lo:hi]) for lo, hi in zip(starts, ends)]
    return [np.unique(seqs.items[lo:hi][np.isin(seqs.behaviors[lo:hi], behaviors)]) for lo, hi in zip(starts, ends)]


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


ITEMKNN_PAIRS = 200_000_000
"""Most (item, item) co-occurrences the ItemKNN baseline may count (about 12 bytes each)."""


def _itemknn_matrix(seqs: Sequences, first_target: np.ndarray, num_items: int) -> tuple[sp.csr_matrix, int | None]:
    """The pre-test history ItemKNN learns its similarities from, and how deep it reaches.

    Co-occurrence counting costs the sum over users of their history length squared:
    about 10^10 on a 100M-event log, hours on two cores. Each history is then cut to its
    most recent ``depth`` events, the largest depth that keeps the count within
    :data:`ITEMKNN_PAIRS`; logs within it (ML-100k) keep every event.

    Returns:
        ([U, M] binary matrix, the depth or ``None`` for full histories).
    """
    starts = seqs.offsets[:-1]
    ends = np.where(first_target >= 0, first_target, seqs.offsets[1:])
    lengths = np.maximum(ends - starts, 0)
    pairs = lambda depth: int((np.minimum(lengths, depth).astype(np.float64) ** 2).sum())
    users = np.arange(seqs.num_users)
    if pairs(lengths.max(initial=0)) <= ITEMKNN_PAIRS:
        return seqs.history_matrix(users, ends, num_items), None
    lo, hi = 1, int(lengths.max())  # the largest depth within the budget, by bisection (pairs grows with depth)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if pairs(mid) <= ITEMKNN_PAIRS else (lo, mid - 1)
    return seqs.history_matrix(users, ends, num_items, starts=np.maximum(starts, ends - lo)), lo


MIN_TEST_USERS = 1000
"""Below this many test users, a metric's sampling error is as large as the differences it is read for."""


def sample_warnings(users: int, final: dict[str, float]) -> list[str]:
    """Warnings for a test set too small to measure with: the 95% margin of the final list's hit rate.

    Args:
        users: test users scored.
        final: the final list's metrics (``hr@10``, or ``recall@10`` on the comirec protocol).
    """
    if users >= MIN_TEST_USERS:
        return []
    name = "hr@10" if "hr@10" in final else "recall@10"
    p = final.get(name, 0.0)
    if users == 0:
        return ["no test users: nothing was measured (the split left no user with a held-out target)"]
    # Binomial 95% margin; with no hit at all, the rule of three bounds the rate instead.
    bound = f"up to {3 / users:.3f} (no hit in {users} users)" if p == 0 else f"about ±{1.96 * math.sqrt(p * (1 - p) / users):.3f}"
    return [
        f"only {users:,} test users: the final {name} of {p:.4f} is known to {bound} at 95%, so differences smaller than that "
        f"are noise; measure on a log with at least {MIN_TEST_USERS:,} test users"
    ]


def format_report(report: dict) -> str:
    """A readable table: one row per method, one column per metric, then the ranker's pair metrics and the lift."""
    rows = [("recall (merged)", report["recall"])]
    rows += [(f"  {name}", m) for name, m in report["recall_channels"].items()]
    rows += [("final (ranked)", report["final"])]
    depth = report.get("itemcf_history")
    rows += [(f"baseline {name}" + (f" (last {depth})" if name == "itemcf" and depth else ""), m) for name, m in report["baselines"].items()]
    cols = COMIREC_COLUMNS if report.get("protocol") == "comirec" else COLUMNS
    counts = ", ".join(f"{name} {report['candidates'][name]}" for name in report["recall_channels"] if name in report["candidates"])  # merge order
    sampled = f" (a sample of {report['test_users']:,})" if report.get("test_users", report["users"]) > report["users"] else ""
    width = max(18, max(len(name) + 1 for name, _ in rows))
    lines = [f"{report['users']:,} users{sampled}, {report['items']:,} items, split {report['split']}; candidates: {counts}", " " * width + "".join(f"{c:>10}" for c in cols)]
    for name, m in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{m[c]:>10.4f}" if c in m else f"{'-':>10}" for c in cols))
    lines += ["", _format_ranker(report["ranker"]), "", _format_lift(report["lift"])]
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def _format_ranker(r: dict) -> str:
    head = f"ranker on held-out pairs: {r['pairs']:,} pairs from {r['users']:,} users whose target was recalled ({r['recalled_share']:.1%})"
    if "auc" not in r:
        return head
    lines = [head, f"  auc {r['auc']:.4f}  gauc {r['gauc']:.4f}  logloss {r['logloss']:.4f}  ece {r['ece']:.4f}"]
    for name, h in r.get("heads", {}).items():
        value = f"{h['auc']:.4f}" if h["auc"] is not None else "n/a"
        lines.append(f"  head {name:9} auc {value}  ({h['positives']:,} positives)")
    return "\n".join(lines)


def _format_lift(lift: dict) -> str:
    lines = ["lift on the same candidates" + f"{'':3}" + "".join(f"{c:>10}" for c in LIFT_KEYS)]
    for name in ("recall", "final"):
        lines.append(f"  {name + ' order':28}" + "".join(f"{lift[name][c]:>10.4f}" for c in LIFT_KEYS))
    ratio = lift["ndcg@10_ratio"]
    lines.append(f"  final / recall ndcg@10: {ratio:.3f}" if ratio is not None else "  final / recall ndcg@10: n/a (recall ndcg@10 is 0)")
    return "\n".join(lines)
