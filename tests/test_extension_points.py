"""A toy recall channel and a toy ranking feature, added through the public extension points alone.

Nothing here edits a Funnel module: the channel is a class that follows
``funnel.recall.plugin.Channel`` plus one ``register_channel`` call, the feature one
``register_feature`` call. Training, the bundle, evaluation and the server pick both up.
"""

import os

import numpy as np
import pytest

from funnel.bundle import load_bundle
from funnel.evaluation.protocol import evaluate_bundle, format_report
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


def same_category_as_last(batch: FeatureBatch) -> np.ndarray:
    """Ranking feature: the candidate is in the category of the user's latest event ([B, C])."""
    return (batch.cand_categories == batch.window.categories[:, -1:]).astype(np.float32)


@pytest.fixture
def extended():
    register_channel(Newest)
    feature = register_feature("toy_same_category_as_last", same_category_as_last)
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
    assert bundle.manifest["rank_features"][-1] == {"name": "toy_same_category_as_last", "dtype": "float32"}
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
