"""``--split comirec`` end to end: train on train users only, evaluate held-out users' target ranges."""

import json

import pytest

from funnel.bundle import load_bundle
from funnel.evaluation.protocol import format_report
from funnel.events.readers import read_events
from funnel.events.split import make_split
from funnel.tools.cli import main

KS = {"recall": (10, 20, 50, 200), "final": (10, 20, 50)}


@pytest.fixture(scope="module")
def comirec_bundle(tiny_log_path, tmp_path_factory) -> str:
    from funnel.rank.train import RankerTrainConfig
    from funnel.recall.train import TwoTowerTrainConfig
    from funnel.tools.train import train

    root = str(tmp_path_factory.mktemp("comirec_bundle"))
    train(
        events=tiny_log_path,
        out=root,
        split="comirec",
        two_tower=TwoTowerTrainConfig(epochs=3, batch_size=128, uniform_negatives=64),
        ranker=RankerTrainConfig(epochs=2, batch_size=128),
        progress=False,
    )
    return root


def keys(ks: tuple[int, ...]) -> set[str]:
    return {f"{m}@{k}" for k in ks for m in ("recall", "hr", "ndcg")}


def test_evaluate_scores_held_out_users_with_multi_target_metrics(comirec_bundle, tiny_log_path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--bundle", comirec_bundle, "--events", tiny_log_path, "--split", "comirec", "--json", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["protocol"] == "comirec" and report["split"] == "comirec"
    seqs = load_bundle(comirec_bundle).data.encode_log(read_events(tiny_log_path))
    assert report["users"] == len(make_split(seqs, "comirec").targets("test")[0]) > 0
    assert set(report["recall"]) == keys(KS["recall"]) and set(report["final"]) == keys(KS["final"])
    assert set(report["recall_channels"]) == {"two_tower", "covisit", "popular"}
    for name, metrics in [("recall", report["recall"]), ("final", report["final"])] + list(report["baselines"].items()):
        assert all(0.0 <= v <= 1.0 for v in metrics.values()), name
        assert metrics["recall@20"] <= metrics["recall@50"] <= metrics["hr@50"], name
    assert set(report["baselines"]["pop"]) == keys(KS["recall"])
    # The planted structure is learnable from train users alone: recall beats popularity.
    assert report["recall"]["recall@50"] > report["baselines"]["pop"]["recall@50"]
    assert "recall@50" in format_report(report) and "recall@50" in capsys.readouterr().out
