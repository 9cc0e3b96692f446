"""``funnel learn``: keep a served bundle learning from the events its servers log.

Each cycle reads the events logged since the current bundle (``LogEvents`` writes them
to the server's ``--event-log``), grows the vocabularies by the new users, items and
categories, warm-starts both models from the bundle and trains them on the new events
plus a replay sample of older ones. New items are added to the index as they are (the
item tower stays fixed for the items the bundle had, so their vectors and the index over
them stay valid); the recall gate decides whether an approximate index needs a rebuild.

The new version is staged, loaded with every bundle check, and published (version
directory, then ``CURRENT`` flips, so every server hot-swaps) only when the gate passes:

* window health: no single item may carry more than ``max_item_share`` of the window
  (a burst on one item is a bot or a broken client, not a taste);
* fresh holdout: on the newest ``holdout`` share of the window's events, kept out of
  training, the new bundle's final HR@10 is at least the current one's less ``tolerance``;
* stable holdout: the same on the last event of a fixed share of users (by a hash of
  their id) while they have no event in the window; every cycle keeps those events out
  of training, so old tastes are measured, not remembered.

Both bundles are scored through their served pipelines (ONNX Runtime); the current one
sees the events it could see as a server does: those on items it does not know are left
out, and such targets are misses. A refused cycle is logged with its figures, the staged
version is removed and the current bundle keeps serving; its events are read again next
cycle, so nothing is lost (``--after SEQ`` skips a bad window on purpose).
"""

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from funnel.bundle import CURRENT, Bundle, BundleError, discard_staged, load_bundle, publish_staged, write_version
from funnel.evaluation.metrics import summarize, target_ranks
from funnel.events.eventlog import read_event_store_since
from funnel.events.sequences import Sequences
from funnel.events.split import Split, first_at_or_after, subsample
from funnel.rank.business import BusinessTables
from funnel.rank.pipeline import TwoStage
from funnel.rank.schema import fit_feature_tables
from funnel.rank.train import RankerTrainConfig, train_ranker
from funnel.recall.index import MIN_GATE_RECALL, add_items, build_index, can_remove, tune_nprobe
from funnel.recall.plugin import fit_channels
from funnel.recall.retriever import Retriever
from funnel.recall.train import TwoTowerTrainConfig, item_vectors, recommendable_items, serving_user_vectors, train_two_tower
from funnel.tools.train import AUTO_INDEX, GATE_K, Stages, choose_index, duration_arg

log = logging.getLogger("funnel.learn")

TWO_TOWER_SHARE = 0.6
"""Share of :attr:`LearnConfig.train_seconds` for the two-tower; the ranker gets the rest."""
LEARNING_LOG = "learning.jsonl"
"""One JSON line per cycle, published or refused, in the bundle root."""


@dataclass
class LearnConfig:
    """Settings of a learning cycle (saved in the manifest of every version it publishes).

    Attributes:
        holdout: share of the window's newest events kept out of training, for the gate
            (half of their users) and early stopping (the other half).
        replay: older training positions drawn per new one, so old tastes stay learned.
        tolerance: the gate's allowance: the new bundle's HR@10 may be this much below the
            current one's on each holdout. 0.02 is about two standard errors of the paired
            difference on the stable holdout's 1,000 users (where the two bundles disagree
            on about one target in ten), more on the fresh holdout's 3,000 targets.
        min_gate_users: fewer fresh-holdout users than this cannot judge a cycle; it is
            refused (and its events wait for the next, larger window).
        gate_targets: the fresh holdout scores at most this many of its events.
        stable_share: share of users (fixed by a hash of their id) whose last event is
            kept out of training; those with no event in the window are the stable holdout.
        stable_users: the stable holdout scores at most this many of them.
        max_item_share: window health: the most any one item may carry of the window's events.
        min_events: a window with fewer new events is left for the next cycle.
        two_tower_epochs, ranker_epochs: warm-start epochs at most (early stopping on the
            fresh holdout's other half, patience 1).
        ranker_examples: ranking groups per cycle at most (their recall and features are
            most of the ranker's preparation).
        train_seconds: time for training both models (0: none); the two-tower gets
            :data:`TWO_TOWER_SHARE` of it, the ranker the rest. Reading, channels, writing
            and the gate come on top (about 20 s at 100k items).
        seed: seeds sampling and training.
        k: the gate's cut-off.
    """

    holdout: float = 0.1
    replay: float = 1.0
    tolerance: float = 0.02
    min_gate_users: int = 50
    gate_targets: int = 3000
    stable_share: float = 0.05
    stable_users: int = 1000
    max_item_share: float = 0.2
    min_events: int = 100
    two_tower_epochs: int = 3
    ranker_epochs: int = 2
    ranker_examples: int = 30_000
    train_seconds: float = 70.0
    seed: int = 0
    k: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be within (0, 1), got {self.holdout}")
        if self.replay < 0 or self.tolerance < 0:
            raise ValueError("replay and tolerance must not be negative")
        if not 0 < self.max_item_share <= 1:
            raise ValueError(f"max_item_share must be within (0, 1], got {self.max_item_share}")


class LearnMetrics:
    """Prometheus metrics of the learning loop, exposed like the server's (``/metrics`` over HTTP).

    Attributes:
        cycles: counter of cycles by ``outcome`` (``published``, ``refused``, ``idle``, ``failed``).
        events: gauge of events learned by the last published cycle.
        hr: gauge of the last cycle's gate HR@10 by ``holdout`` (``fresh``, ``stable``) and ``bundle`` (``current``, ``learned``).
        seconds: gauge of the last cycle's seconds.
        freshness: gauge of the newest learned event's age when the last cycle published (seconds).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cycles = Counter("funnel_learn_cycles", "Learning cycles by outcome.", ["outcome"], registry=r)
        self.events = Gauge("funnel_learn_events", "Events learned by the last published cycle.", registry=r)
        self.hr = Gauge("funnel_learn_holdout_hr", "Gate HR@10 of the last cycle.", ["holdout", "bundle"], registry=r)
        self.seconds = Gauge("funnel_learn_cycle_seconds", "Seconds the last cycle took.", registry=r)
        self.freshness = Gauge("funnel_learn_freshness_seconds", "Age of the newest learned event when the last cycle published.", registry=r)

    def record(self, report: dict) -> None:
        """Update the metrics from a cycle's report (:func:`learn_cycle`)."""
        self.cycles.labels(report["outcome"]).inc()
        self.seconds.set(report.get("seconds", 0.0))
        for holdout, figures in report.get("gate", {}).get("holdouts", {}).items():
            for bundle in ("current", "learned"):
                self.hr.labels(holdout, bundle).set(figures[bundle][f"hr@{report['gate']['k']}"])
        if report["outcome"] == "published":
            self.events.set(report["events"])
            self.freshness.set(report["freshness_seconds"])

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Expose ``/metrics`` over HTTP on a daemon thread; returns the HTTP server."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return server


def learn_cycle(*, bundle_root: str, event_log: str, config: LearnConfig | None = None, after: int | None = None, progress: bool = False) -> dict:
    """Run one learning cycle: learn the events logged since the current bundle, gate, publish.

    Args:
        bundle_root: the served bundle root (``CURRENT`` names the version to start from).
        event_log: the servers' event store (``funnel serve --event-log``).
        config: cycle settings (defaults when omitted).
        after: learn the events after this sequence number instead of after the ones the
            current bundle already holds (to skip a window on purpose).
        progress: progress bars.

    Returns:
        The cycle's report: ``outcome`` (``published``, ``refused`` or ``idle``), events
        learned, the gate's figures and reasons, seconds, the version published, also
        appended to ``bundle_root/learning.jsonl``.

    Raises:
        BundleError: the current bundle does not load.
        FileNotFoundError, EventStoreError: the event store is missing or unreadable.
    """
    cfg = config or LearnConfig()
    started = time.time()
    if not os.path.isfile(os.path.join(bundle_root, CURRENT)):
        raise BundleError(f"{bundle_root}: not a bundle root (no {CURRENT} file); learning publishes new versions beside the current one")
    stage = Stages()
    with stage("load"):
        bundle = load_bundle(bundle_root)
        store = os.path.abspath(event_log)
        learned = bundle.manifest.get("learning") or {}
        if after is None:
            after = int(learned.get("event_seq", 0)) if learned.get("event_log") == store else 0
        window, last_seq = read_event_store_since(event_log, after)
    report = {"parent": bundle.model_version, "event_log": store, "after_seq": after, "to_seq": last_seq, "events": len(window.events), "config": asdict(cfg)}
    if len(window.events) < cfg.min_events:
        log.info("%d new events after seq %d (fewer than %d): nothing to learn yet", len(window.events), after, cfg.min_events)
        return _finish(bundle_root, report, "idle", started)

    with stage("grow"):
        data, fresh = bundle.data.grow(window)
        old_items = bundle.data.items.size
        health = _window_health(window.events["item"].to_numpy(), cfg.max_item_share)
        split, gate_users, gate_pos, examples, stable_users, stable_pos = _learning_split(data.seqs, fresh, cfg)
    report["new"] = {"users": int(data.users.size - bundle.data.users.size), "items": int(data.items.size - old_items), "categories": int(data.categories.size - bundle.data.categories.size)}
    log.info("window after seq %d: %d events (%d new users, %d new items); training on %d positions", after, len(window.events), report["new"]["users"], report["new"]["items"], int(examples.sum()))

    with stage("two_tower"):
        tt_cfg = TwoTowerTrainConfig(
            epochs=cfg.two_tower_epochs, patience=1, seed=cfg.seed, max_seconds=cfg.train_seconds * TWO_TOWER_SHARE, budget_epochs=cfg.two_tower_epochs
        )
        model, tt_history = train_two_tower(data, split, train_config=tt_cfg, init=bundle.two_tower, examples=examples, progress=progress)
    with stage("index"):
        mask = split.train_mask(data.seqs)
        in_train = np.bincount(data.seqs.items[mask], minlength=data.items.size) > 0
        # Items the bundle had keep their cold or trained state (their id rows stayed fixed);
        # new items are trained where they occur in the window's training part.
        was_known = np.concatenate([bundle.popularity.counts > 0, np.zeros(data.items.size - old_items, bool)])
        trained_now = np.bincount(data.seqs.items[mask & fresh], minlength=data.items.size) > 0
        known = was_known | (trained_now & (np.arange(data.items.size) >= old_items))
        vecs = item_vectors(model, data, known)
        recommendable = recommendable_items(data, in_train)
        index, spec, index_report = _grown_index(bundle, model, data, split, vecs, recommendable, cfg.seed)
    with stage("channels"):
        channels = fit_channels(data, mask, like=bundle.channels)  # the bundle's channels, refitted on the grown log
        retriever = Retriever(model, vecs, index, channels, data.item_category, bundle.recall_config, recommendable)
    with stage("business"):
        business = BusinessTables.fit(data.seqs, mask, data.item_category)
        fitted = fit_feature_tables(data, mask)
    with stage("ranker"):
        rk_cfg = RankerTrainConfig(
            epochs=cfg.ranker_epochs, patience=1, seed=cfg.seed, max_seconds=cfg.train_seconds * (1 - TWO_TOWER_SHARE), budget_epochs=cfg.ranker_epochs,
            max_examples=cfg.ranker_examples,
        )
        ranker, rk_history = train_ranker(data, split, retriever, retriever.channel("popular").counts, business, fitted=fitted, train_config=rk_cfg, init=bundle.ranker, examples=examples, progress=progress)

    window_end = int(window.events["ts"].max())
    info = {
        "data": {**bundle.manifest.get("data", {}), "rows": int(len(data.seqs))},
        "training": {"two_tower": tt_history, "ranker": rk_history, "stages": stage.report},
        "index_choice": index_report,
        "learning": {"parent": bundle.model_version, "event_log": store, "event_seq": last_seq, "after_seq": after, "events": len(window.events), "window_end": window_end},
    }
    with stage("write"):
        staged = write_version(
            bundle_root, data=data, two_tower=model, ranker=ranker, item_vecs=vecs, index=index, index_spec=spec,
            channels=channels, recall_config=bundle.recall_config, business=business, fitted=fitted, info=info, publish=False,
        )
    try:
        with stage("gate"):
            candidate = load_bundle(staged)  # every bundle check: files, sizes, checksums, smoke shapes
            gate = _gate(bundle, candidate, data.seqs, (gate_users, gate_pos), (stable_users, stable_pos), health, cfg)
    except BaseException:
        discard_staged(staged)
        raise
    report["gate"] = gate
    report["stages"] = stage.report
    if not gate["passed"]:
        discard_staged(staged)
        log.warning("cycle refused, %s keeps serving: %s", bundle.model_version, "; ".join(gate["reasons"]))
        return _finish(bundle_root, report, "refused", started)
    report["freshness_seconds"] = round(time.time() - window_end, 1)
    report["seconds"] = round(time.time() - started, 1)
    info["learning"].update(gate=gate, seconds=report["seconds"], freshness_seconds=report["freshness_seconds"])
    report["version"] = publish_staged(bundle_root, staged, {"learning": info["learning"]})
    log.info("cycle published %s in %.0f s: %s", report["version"], report["seconds"], _brief(gate))
    return _finish(bundle_root, report, "published", started)


def _finish(root: str, report: dict, outcome: str, started: float) -> dict:
    """Stamp the outcome and seconds on a cycle's report and append it to the root's learning log."""
    report["outcome"] = outcome
    report["seconds"] = round(time.time() - started, 1)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(os.path.join(root, LEARNING_LOG), "a") as fh:
        fh.write(json.dumps(report, sort_keys=True) + "\n")
    return report


def _window_health(items: np.ndarray, max_share: float) -> dict:
    """The share of the window's events on its most frequent item, and whether it is within ``max_share``."""
    _, counts = np.unique(items, return_counts=True)
    share = float(counts.max() / counts.sum()) if len(counts) else 0.0
    return {"top_item_share": round(share, 4), "max_item_share": max_share, "ok": share <= max_share}


def _learning_split(seqs: Sequences, fresh: np.ndarray, cfg: LearnConfig) -> tuple[Split, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training part, holdouts and training examples of one cycle.

    The newest ``cfg.holdout`` share of the window's events is cut off by time: every
    user trains on the events before the cut. Half of the users with events after it (by
    id parity) are the early-stopping validation (their first event after the cut), the
    other half the gate's fresh holdout (each of their events after the cut, at most
    ``cfg.gate_targets``). The stable holdout is the last
    event of a fixed share of users while they have no event in the window (and three or
    more before it); it is kept out of training, channels and tables.

    Returns:
        (split, gate target users and positions, examples: bool [N] training positions the
        models learn from, stable users, stable positions).
    """
    rng = np.random.default_rng(cfg.seed)
    cut = np.quantile(seqs.ts[fresh], 1 - cfg.holdout, method="higher")
    starts, ends = seqs.offsets[:-1], seqs.offsets[1:]
    first_after = first_at_or_after(seqs, cut)
    targeted = first_after < ends
    users = np.arange(seqs.num_users)
    stop = targeted & (users % 2 == 0)
    # Every event after the cut of the gate's users is a target (history: everything before
    # it): several times more targets than first events alone, so a cycle is judged on less noise.
    gate = np.zeros(seqs.num_users + 1, bool)
    gate[:-1] = targeted & ~stop
    owner = seqs.user_positions()
    after = np.flatnonzero(gate[owner] & (np.arange(len(seqs)) >= first_after[owner]))
    (gate_pos,) = subsample(rng, cfg.gate_targets, after)
    gate_users = owner[gate_pos]
    # Stable holdout: the last event of a fixed share of users (by a hash of their id, which
    # never changes), scored while they have no event in the window. Every cycle keeps
    # these users' last event out of training, window or not, so the current bundle, if
    # learned, never trained on a stable target either.
    rank = _user_rank(users)
    held = np.flatnonzero((rank < cfg.stable_share) & (ends - starts >= 3))
    quiet = held[_counts(fresh, seqs.offsets)[held] == 0]
    stable_users = quiet[np.argsort(rank[quiet], kind="stable")[: cfg.stable_users]]
    stable_pos = ends[stable_users] - 1
    train_end = first_after.copy()
    train_end[held] = np.minimum(first_after[held], ends[held] - 1)
    split = Split(kind="learn", train_end=train_end, valid_pos=np.where(stop, first_after, -1), test_pos=np.full(seqs.num_users, -1))
    in_train = split.train_mask(seqs)
    examples = in_train & fresh
    older = np.flatnonzero(in_train & ~fresh)
    replay = rng.choice(older, min(len(older), int(cfg.replay * examples.sum())), replace=False)
    examples[replay] = True
    return split, gate_users, gate_pos, examples, stable_users, stable_pos


def _user_rank(users: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per user id (a multiplicative hash), the same in every cycle."""
    mixed = users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps modulo 2**64
    return (mixed >> np.uint64(11)).astype(np.float64) / 2.0**53


def _counts(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per user, how many of its positions are flagged (``flags`` bool [N], ``offsets`` [U + 1])."""
    cum = np.concatenate([[0], np.cumsum(flags)])
    return cum[offsets[1:]] - cum[offsets[:-1]]


def _grown_index(bundle: Bundle, model, data, split: Split, vecs: np.ndarray, recommendable: np.ndarray, seed: int):
    """The bundle's index with the new recommendable items added (and changed vectors replaced).

    An approximate index is checked with the recall gate (recall@200 against exact search
    on real user vectors) and rebuilt, sized to the grown catalogue, when it falls short.

    Returns:
        (index, spec, what was done).
    """
    old = len(bundle.item_vecs)
    index = faiss.clone_index(bundle.index)
    before = np.zeros(len(vecs), bool)
    before[: len(bundle.recommendable)] = bundle.recommendable
    changed = np.flatnonzero(before[:old] & recommendable[:old] & (np.abs(vecs[:old] - bundle.item_vecs).max(1) > 1e-4))
    added = np.flatnonzero(recommendable & ~before)
    # Items whose only events are now held out (a user who fell quiet has their last event
    # in the stable holdout) leave the index, as held-out-only items do in training.
    dropped = np.flatnonzero(before & ~recommendable)
    if len(dropped):
        if not can_remove(index):
            log.info("%d items left the training part and %s cannot remove vectors: rebuilding", len(dropped), bundle.index_spec)
            ids = np.flatnonzero(recommendable)
            return build_index(vecs[ids], ids, bundle.index_spec), bundle.index_spec, {"rebuilt": "items left the index", "spec": str(bundle.index_spec)}
        index.remove_ids(dropped)
    if len(changed):
        add_items(index, vecs[changed], changed, replace=True)
    if len(added):
        add_items(index, vecs[added], added)
    report = {"added": int(len(added)), "replaced": int(len(changed)), "removed": int(len(dropped)), "spec": str(bundle.index_spec)}
    if bundle.index_spec.kind == "flat":
        return index, bundle.index_spec, report
    users, _ = split.targets("valid")
    if not len(users):
        return index, bundle.index_spec, {**report, "recall_gate": "no validation users to check it with"}
    pick = np.random.default_rng(seed).permutation(len(users))[:1000]
    queries = serving_user_vectors(model, data, users[pick])
    k = min(GATE_K, int(recommendable.sum()))
    spec, tried = tune_nprobe(index, bundle.index_spec, queries, vecs, recommendable, k, MIN_GATE_RECALL)
    report["recall_at_k"] = tried
    if tried[str(spec)] >= MIN_GATE_RECALL:
        return index, spec, report
    log.info("grown index recall %s below %.2f: rebuilding", tried, MIN_GATE_RECALL)
    spec, choice, built = choose_index(AUTO_INDEX, model, data, split, vecs, recommendable, seed)
    if built is None:
        ids = np.flatnonzero(recommendable)
        built = build_index(vecs[ids], ids, spec)
    return built, spec, {**report, "rebuilt": choice}


def _gate(current: Bundle, learned: Bundle, seqs: Sequences, fresh_targets, stable_targets, health: dict, cfg: LearnConfig) -> dict:
    """Score both bundles on both holdouts through their served pipelines; decide whether to publish."""
    old_items = current.data.items.size
    holdouts = {}
    for name, (users, positions) in (("fresh", fresh_targets), ("stable", stable_targets)):
        holdouts[name] = {
            "users": int(len(np.unique(users))),
            "targets": int(len(users)),
            "current": holdout_scores(current.pipeline(), known_only(seqs, old_items), old_items, users, positions, seqs, cfg.k),
            "learned": holdout_scores(learned.pipeline(), (seqs, None), learned.data.items.size, users, positions, seqs, cfg.k),
        }
    key = f"hr@{cfg.k}"
    reasons = []
    if not health["ok"]:
        reasons.append(f"window health: one item carries {health['top_item_share']:.1%} of the window's events (limit {health['max_item_share']:.0%})")
    if holdouts["fresh"]["users"] < cfg.min_gate_users:
        reasons.append(f"fresh holdout: {holdouts['fresh']['users']} users, fewer than {cfg.min_gate_users} to judge by")
    for name, h in holdouts.items():
        if h["users"] and h["learned"][key] < h["current"][key] - cfg.tolerance:
            reasons.append(f"{name} holdout: {key} {h['learned'][key]:.4f} against the current {h['current'][key]:.4f} (tolerance {cfg.tolerance})")
    return {"passed": not reasons, "reasons": reasons, "k": cfg.k, "tolerance": cfg.tolerance, "health": health, "holdouts": holdouts}


def known_only(seqs: Sequences, num_items: int) -> tuple[Sequences, np.ndarray]:
    """The sequences as a bundle knowing only the first ``num_items`` ids sees them (events on later items left out, as a server does).

    Returns:
        The reduced sequences, and for every original position the number of kept events
        before it (a history ending before position ``p`` ends before ``kept[p]``).
    """
    keep = seqs.items < num_items
    kept = np.concatenate([[0], np.cumsum(keep)])
    return Sequences(kept[seqs.offsets], seqs.items[keep], seqs.categories[keep], seqs.behaviors[keep], seqs.ts[keep]), kept


def holdout_scores(pipeline: TwoStage, view: tuple[Sequences, np.ndarray | None], num_items: int, users: np.ndarray, positions: np.ndarray, seqs: Sequences, k: int, batch: int = 512) -> dict:
    """HR and NDCG at ``k`` of the pipeline's final lists for the targets at ``positions`` of ``seqs``, histories from ``view``."""
    if not len(users):
        return {f"hr@{k}": 0.0, f"ndcg@{k}": 0.0}
    vseqs, kept = view
    ends = positions if kept is None else kept[positions]
    tops = []
    for lo in range(0, len(users), batch):
        u, e = users[lo : lo + batch], ends[lo : lo + batch]
        now = seqs.ts[positions[lo : lo + batch]]
        window = vseqs.window(e, pipeline.history, vseqs.offsets[u])
        cands = pipeline.retriever.retrieve(window.tail(pipeline.retriever.model.cfg.history), now, vseqs.history_matrix(u, e, num_items))
        ranked = window.tail(pipeline.ranker.cfg.history)
        items = pipeline.order(ranked, cands, pipeline.features(ranked, now, e - vseqs.offsets[u], cands)).items[:, :k]
        top = np.full((len(u), k), -1, np.int64)
        top[:, : items.shape[1]] = np.where(items > 0, items, -1)
        tops.append(top)
    metrics = summarize(target_ranks(np.concatenate(tops), seqs.items[positions]), ks=(k,))
    return {name: round(float(v), 4) for name, v in metrics.items() if name in (f"hr@{k}", f"ndcg@{k}")}


def _brief(gate: dict) -> str:
    key = f"hr@{gate['k']}"
    return ", ".join(f"{name} {key} {h['current'][key]:.4f} -> {h['learned'][key]:.4f} ({h['targets']} targets)" for name, h in gate["holdouts"].items())


def learn(*, bundle_root: str, event_log: str, config: LearnConfig | None = None, every: float | None = None, cycles: int | None = None, after: int | None = None, metrics: LearnMetrics | None = None, progress: bool = False) -> list[dict]:
    """Run learning cycles: one, or one every ``every`` seconds.

    Args:
        bundle_root, event_log, config, after, progress: as for :func:`learn_cycle` (``after`` applies to the first cycle).
        every: seconds from one cycle's start to the next (None: one cycle and return).
        cycles: stop after this many cycles (None: one without ``every``, else run until stopped).
        metrics: updated after every cycle.

    Returns:
        The cycles' reports. In a loop, a cycle that fails is logged, counted as ``failed``
        and retried at the next tick; a single cycle's error is raised.
    """
    reports = []
    limit = cycles if cycles is not None else (None if every else 1)
    while limit is None or len(reports) < limit:
        started = time.time()
        try:
            report = learn_cycle(bundle_root=bundle_root, event_log=event_log, config=config, after=after, progress=progress)
        except Exception as err:
            if not every:
                raise
            log.exception("learning cycle failed; retrying in %.0f s", every)
            report = {"outcome": "failed", "error": str(err)}
        after = None
        reports.append(report)
        if metrics is not None:
            metrics.record(report)
        if every and (limit is None or len(reports) < limit):
            time.sleep(max(0.0, every - (time.time() - started)))
    return reports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    d = LearnConfig()
    parser.add_argument("--bundle-root", required=True, help="the served bundle root; each cycle starts from the version CURRENT names and publishes beside it")
    parser.add_argument("--event-log", required=True, help="the event store the servers write (funnel serve --event-log)")
    parser.add_argument("--every", type=duration_arg, default=None, metavar="DURATION", help="run a cycle every DURATION (e.g. 10m) until stopped (default: one cycle)")
    parser.add_argument("--cycles", type=int, default=None, help="stop after this many cycles (default: 1 without --every, else none)")
    parser.add_argument("--after", type=int, default=None, metavar="SEQ", help="learn the events after this event-store sequence number, skipping earlier ones (default: after those the current bundle holds)")
    parser.add_argument("--holdout", type=float, default=d.holdout, help=f"share of the window's newest events held out for the gate and early stopping (default: {d.holdout})")
    parser.add_argument("--replay", type=float, default=d.replay, help=f"older training positions replayed per new one (default: {d.replay})")
    parser.add_argument("--tolerance", type=float, default=d.tolerance, help=f"how far below the current bundle's HR@{d.k} the learned one may be on each holdout (default: {d.tolerance})")
    parser.add_argument("--max-item-share", type=float, default=d.max_item_share, help=f"refuse a window where one item carries more than this share of the events (default: {d.max_item_share})")
    parser.add_argument("--min-events", type=int, default=d.min_events, help=f"leave a window with fewer new events for the next cycle (default: {d.min_events})")
    parser.add_argument(
        "--train-seconds", type=float, default=d.train_seconds,
        help=f"seconds for training both models per cycle, {TWO_TOWER_SHARE * 100:.0f}%% to the two-tower; 0: train to early stopping (default: {d.train_seconds:g})",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    parser.add_argument("--metrics-port", type=int, default=None, help="expose Prometheus metrics of the cycles on this port (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    config = LearnConfig(
        holdout=args.holdout, replay=args.replay, tolerance=args.tolerance, max_item_share=args.max_item_share, min_events=args.min_events,
        train_seconds=args.train_seconds, seed=args.seed,
    )
    metrics = LearnMetrics()
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port)
    try:
        reports = learn(
            bundle_root=args.bundle_root, event_log=args.event_log, config=config, every=args.every, cycles=args.cycles, after=args.after,
            metrics=metrics, progress=not args.no_progress and sys.stderr.isatty(),
        )
    except KeyboardInterrupt:  # the way to stop --every; a cycle cut short publishes nothing (its version was only staged)
        log.info("stopped")
        return 0
    for report in reports:
        print(json.dumps({k: report.get(k) for k in ("outcome", "version", "events", "seconds")} | {"reasons": report.get("gate", {}).get("reasons")}))
    return 0 if all(r["outcome"] != "failed" for r in reports) else 1
