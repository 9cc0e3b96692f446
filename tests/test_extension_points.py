"""A toy recall channel and a toy business feature, added through the public extension points alone.

Nothing here edits a Funnel module: the channel is a class that follows
``funnel.recall.plugin.Channel`` plus one ``register_channel`` call, the feature one
``register_feature`` call with its own statistics fitted from the log. Training, the
bundle, evaluation and the server pick both up.
"""

import os

import numpy as np
import pytest

from funnel.bundle import load_bundle
from funnel.evaluation.protocol import evaluate_bundle, format_report
from funnel.events.schema import BEHAVIOR_CODE
from funnel.rank.features import dense_names
from funnel.rank.schema import FeatureBatch, register_feature, unregister
from funnel.recall.plugin import ChannelQuery, register_channel, unregister_channel
from funnel.server.app import create_server
from funnel.server.engine import Engine
from funnel.tools.recommend import recommend


class Newest:
    """Recall channel: the items with the latest training events, newest first."""

    name = "toy_newest"
    default_count = 10

    def __init__(self, ranked: np.ndarray):
        self.ranked = ranked

    @classmethod
    def fit(cls, data, mask):
        last = np.zeros(data.items.size, np.int64)
        np.maximum.at(last, data.seqs.items[mask], data.seqs.ts[mask])
        ranked = np.argsort(-last, kind="stable")
        return cls(ranked[last[ranked] > 0])

    def candidates(self, query: ChannelQuery, k: int) -> np.ndarray:
        width = min(len(self.ranked), k + query.exclude.most_per_row)
        return query.allowed(np.broadcast_to(self.ranked[:width], (len(query.user_vecs), width)), k)

    def save(self, directory: str) -> None:
        np.save(os.path.join(directory, f"{self.name}.npy"), self.ranked)

    @classmethod
    def load(cls, directory: str) -> "Newest":
        return cls(np.load(os.path.join(directory, f"{cls.name}.npy")))


def fit_buy_share(data, mask) -> dict[str, np.ndarray]:
    """Business statistics of the training part: each item's share of buys among its events."""
    items, buys = data.seqs.items[mask], data.seqs.behaviors[mask] == BEHAVIOR_CODE["buy"]
    events = np.bincount(items, minlength=data.items.size)
    return {"share": np.bincount(items, weights=buys, minlength=data.items.size) / np.maximum(events, 1)}


def buy_share(batch: FeatureBatch) -> np.ndarray:
    """Ranking feature: the candidate's buy share, read from the fitted table ([B, C]; unknown ids 0)."""
    share = batch.tables.fitted["toy_buy_share"]["share"]
    return np.where(batch.cand_items < len(share), share[np.minimum(batch.cand_items, len(share) - 1)], 0.0)


@pytest.fixture
def extended():
    register_channel(Newest)
    feature = register_feature("toy_buy_share", buy_share, fit=fit_buy_share)
    yield
    unregister(feature)
    unregister_channel(Newest.name)


def test_a_toy_channel_and_feature_train_serve_and_answer(extended, tiny_log_path, tmp_path):
    from funnel.rank.train import RankerTrainConfig
    from funnel.recall.train import TwoTowerTrainConfig
    from funnel.tools.train import train

    root = str(tmp_path / "bundle")
    train(
        events=tiny_log_path, out=root, progress=False,
        two_tower=TwoTowerTrainConfig(epochs=1, batch_size=128, uniform_negatives=64), ranker=RankerTrainConfig(epochs=1, batch_size=128),
    )  # fmt: skip
    bundle = load_bundle(root)
    assert bundle.manifest["recall_channels"] == ["covisit", "popular", "toy_newest"]
    assert bundle.manifest["recall_config"]["toy_newest"] == Newest.default_count
    assert bundle.manifest["rank_features"][-1] == {"name": "toy_buy_share", "dtype": "float32"}
    share = bundle.fitted["toy_buy_share"]["share"]  # fitted on the training part, stored in the bundle
    assert share.shape == (bundle.data.items.size,) and 0 < share.max() <= 1
    assert bundle.ranker.cfg.num_dense == len(dense_names()) and bundle.ranker.cfg.num_channels == 5

    # Served with the toy channel asked for most candidates, so some of its items reach the answer.
    engine = Engine.load(root, candidates={"two_tower": 5, "toy_newest": 40})
    server, port = create_server("127.0.0.1:0", engine)
    server.start()
    try:
        user = str(bundle.data.users.decode(np.array([1]))[0])
        result = recommend(addr=f"127.0.0.1:{port}", user_id=user, k=30)
    finally:
        server.stop(None)
    channels = {r.channel for r in result.items}
    assert "toy_newest" in channels and channels <= {"two_tower", "covisit", "popular", "toy_newest"}

    # Evaluation reports the channel beside the built-in ones.
    report, _ = evaluate_bundle(bundle=root, events=tiny_log_path, progress=False)
    assert list(report["recall_channels"]) == ["two_tower", "covisit", "popular", "toy_newest"]
    assert "toy_newest 10" in format_report(report)


def test_a_bundle_needing_an_unregistered_channel_is_refused(tiny_bundle, tmp_path):
    import json
    import shutil

    from funnel.bundle import BundleError, resolve

    copy = tmp_path / "copy"
    shutil.copytree(resolve(tiny_bundle), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["recall_channels"].append("nowhere")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="recall channel 'nowhere' is not registered"):
        load_bundle(str(copy))
