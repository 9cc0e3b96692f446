from funnel.evaluation.summary import summarize_runs
from funnel.rank.train import RankerTrainConfig
from funnel.recall.train import TwoTowerTrainConfig
from funnel.tools import seeds
from funnel.tools.seeds import run_seeds


def test_summarize_runs_hand_computed():
    runs = [{"a": 1.0, "b": 2, "c": "x"}, {"a": 3.0, "b": 2}]
    s = summarize_runs(runs)
    assert set(s) == {"a", "b"}
    assert s["a"] == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert s["b"]["std"] == 0.0


def test_run_seeds_trains_and_evaluates_each_seed(tiny_log_path, tmp_path, monkeypatch):
    real_train = seeds.train
    short = dict(two_tower=TwoTowerTrainConfig(epochs=1, batch_size=128, uniform_negatives=32), ranker=RankerTrainConfig(epochs=1, batch_size=128))
    monkeypatch.setattr(seeds, "train", lambda **kw: real_train(**kw, **short))
    result = run_seeds(events=tiny_log_path, out=str(tmp_path / "b"), seeds=(0, 1), json_out=str(tmp_path / "s.json"))
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    assert result["runs"][0]["bundle"] != result["runs"][1]["bundle"]
    summary = result["summary"]
    for key in ("final.ndcg@10", "recall_channels.two_tower.hr@10", "train_seconds"):
        assert summary[key]["min"] <= summary[key]["mean"] <= summary[key]["max"]
    assert (tmp_path / "s.json").exists()
    assert "final.ndcg@10" in seeds.format_summary(result)
