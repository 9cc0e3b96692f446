"""``funnel learn``: a cycle grows the bundle by new items and publishes; a flooded window is refused."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from prometheus_client.exposition import generate_latest

from funnel.bundle import CURRENT, load_bundle, resolve
from funnel.events.eventlog import EventStore, UserEvent
from funnel.events.schema import TAOBAO_COLUMNS
from funnel.events.synth import SynthConfig, generate
from funnel.rank.train import RankerTrainConfig
from funnel.recall.retriever import TWO_TOWER
from funnel.recall.train import TwoTowerTrainConfig
from funnel.tools.learn import LEARNING_LOG, LearnConfig, LearnMetrics, learn_cycle
from funnel.tools.train import train

# The judging rules are tested apart (the flood test); here the gate only must not block learning.
LENIENT = LearnConfig(tolerance=1.0, min_gate_users=1, min_events=10)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A log with items released over time: the first 70% by time trains the base bundle, the rest is the stream."""
    tmp = tmp_path_factory.mktemp("learn")
    path = str(tmp / "log.csv")
    generate(path, SynthConfig(n_users=400, n_items=1_500, n_categories=10, events_per_user=40.0, new_items=0.4, seed=5), progress=False)
    df = pd.read_csv(path, header=None, names=list(TAOBAO_COLUMNS))
    cut = df["timestamp"].quantile(0.7)
    base = str(tmp / "base.csv")
    df[df["timestamp"] < cut].to_csv(base, header=False, index=False)
    rest = df[df["timestamp"] >= cut].sort_values("timestamp", kind="stable")
    return tmp, base, rest


def _bundle(tmp, base: str, name: str) -> str:
    root = str(tmp / name)
    train(
        events=base, out=root, two_tower=TwoTowerTrainConfig(epochs=2, batch_size=128, uniform_negatives=64),
        ranker=RankerTrainConfig(epochs=2, batch_size=128), progress=False,
    )
    return root


def _events(frame: pd.DataFrame) -> list[UserEvent]:
    return [UserEvent(str(r.user_id), str(r.item_id), str(r.category_id), r.behavior_type, int(r.timestamp)) for r in frame.itertuples()]


def test_a_cycle_learns_new_items_and_recalls_them_through_the_two_tower(stream):
    tmp, base, rest = stream
    root = _bundle(tmp, base, "grow")
    before = load_bundle(root)
    store_path = str(tmp / "grow.db")
    store = EventStore(store_path)
    store.append(_events(rest.iloc[: len(rest) // 2]))
    report = learn_cycle(bundle_root=root, event_log=store_path, config=LENIENT)
    assert report["outcome"] == "published", report.get("gate")
    metrics = LearnMetrics()
    metrics.record(report)
    text = generate_latest(metrics.registry).decode()
    assert 'funnel_learn_cycles_total{outcome="published"} 1.0' in text
    assert f"funnel_learn_events {float(report['events'])}" in text
    assert 'funnel_learn_holdout_hr{bundle="learned",holdout="fresh"}' in text
    after = load_bundle(root)
    assert after.model_version == report["version"].rsplit("/", 1)[-1] != before.model_version
    assert after.manifest["learning"]["event_seq"] == store.count()
    assert report["new"]["items"] > 0 and after.data.items.size == before.data.items.size + report["new"]["items"]
    # The bundle's items kept their vectors (the item tower was fixed for them); the new ones joined the index.
    old = before.data.items.size
    assert np.allclose(after.item_vecs[:old], before.item_vecs, atol=1e-5)
    assert after.index.ntotal > before.index.ntotal
    # Users of the window now get items the base bundle never saw from the two-tower channel.
    users = np.flatnonzero(after.data.seqs.lengths > 0)
    window = after.data.seqs.user_window(users, after.two_tower.cfg.history)
    now = after.data.seqs.ts[after.data.seqs.offsets[users + 1] - 1]
    exclude = after.data.seqs.history_matrix(users, after.data.seqs.offsets[users + 1], after.data.items.size)
    cands = after.retriever(runtime="torch").retrieve(window, now, exclude, channels=(TWO_TOWER,))
    recalled_new = np.unique(cands.items[(cands.items >= old) & (cands.channels == 1)])
    assert len(recalled_new) > 0
    # Nothing new: the next cycle is idle and publishes nothing.
    again = learn_cycle(bundle_root=root, event_log=store_path, config=LENIENT)
    assert again["outcome"] == "idle" and load_bundle(root).model_version == after.model_version
    lines = [json.loads(line) for line in open(os.path.join(root, LEARNING_LOG))]
    assert [line["outcome"] for line in lines] == ["published", "idle"]


def test_a_window_flooded_with_one_item_is_refused_and_the_old_bundle_keeps_serving(stream):
    tmp, base, rest = stream
    root = _bundle(tmp, base, "flood")
    current = open(os.path.join(root, CURRENT)).read()
    versions = sorted(os.listdir(os.path.join(root, "versions")))
    store_path = str(tmp / "flood.db")
    store = EventStore(store_path)
    window = rest.iloc[: len(rest) // 2].copy()
    top = window["item_id"].value_counts().index[0]
    window["item_id"] = top  # every event on one item: a bot or a broken client
    store.append(_events(window))
    report = learn_cycle(bundle_root=root, event_log=store_path, config=LearnConfig(min_events=10))
    assert report["outcome"] == "refused"
    assert any("window health" in reason for reason in report["gate"]["reasons"])
    assert report["gate"]["health"]["top_item_share"] == 1.0
    assert open(os.path.join(root, CURRENT)).read() == current
    assert sorted(os.listdir(os.path.join(root, "versions"))) == versions  # the staged version is gone
    assert resolve(root).endswith(current.strip())
    line = json.loads(open(os.path.join(root, LEARNING_LOG)).read().splitlines()[-1])
    assert line["outcome"] == "refused" and line["gate"]["holdouts"]["fresh"]["users"] > 0
