"""train → evaluate → rebuild-index through their keyword-argument entry points and the CLI."""

import json

import pytest

from funnel.bundle import load_bundle, resolve
from funnel.evaluation.protocol import format_report
from funnel.rank.train import RankerTrainConfig
from funnel.recall.train import TwoTowerTrainConfig
from funnel.tools.cli import main
from funnel.tools.evaluate import evaluate
from funnel.tools.rebuild_index import IndexRejected, rebuild_index
from funnel.tools.train import TWO_TOWER_SHARE, WRITE_SHARE, parse_duration, train

METRICS = {"recall": {"hr@10", "ndcg@10", "hr@50", "hr@200"}, "final": {"hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr@10"}}


def test_evaluate_reports_every_section(tiny_bundle, tiny_log_path, tmp_path):
    out = tmp_path / "eval.json"
    report = evaluate(bundle=tiny_bundle, events=tiny_log_path, json_out=str(out), report_dir=str(tmp_path / "report"), progress=False)
    saved = json.loads(out.read_text())
    assert saved["users"] == report["users"] > 0
    for section, keys in METRICS.items():
        assert keys <= set(saved[section])
    assert set(saved["baselines"]) == {"pop", "itemcf"} and keys <= set(saved["baselines"]["pop"]) | METRICS["final"]
    assert set(saved["recall_channels"]) == {"two_tower", "covisit", "popular"}
    # The planted structure is learnable: the trained pipeline beats popularity.
    assert saved["recall"]["hr@50"] > saved["baselines"]["pop"]["hr@50"]
    assert "final (ranked)" in format_report(report)
    ranker = saved["ranker"]
    assert 0 < ranker["users"] <= saved["users"] and ranker["pairs"] > ranker["users"]
    assert 0.0 <= ranker["auc"] <= 1.0 and 0.0 <= ranker["gauc"] <= 1.0 and ranker["logloss"] > 0
    assert sum(ranker["calibration"]["count"]) == ranker["pairs"]
    lift = saved["lift"]
    assert lift["recall"]["ndcg@10"] == saved["recall"]["ndcg@10"] and lift["final"]["hr@50"] == saved["final"]["hr@50"]
    assert lift["ndcg@10_ratio"] == pytest.approx(saved["final"]["ndcg@10"] / saved["recall"]["ndcg@10"], abs=1e-4)
    assert "auc" in format_report(report) and "final / recall ndcg@10" in format_report(report)
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("<svg") == 3 and "Reliability" in page
    for method in ("recall (merged)", "final (ranked)", "baseline pop", "baseline itemcf"):
        assert f"data-name='{method}'" in page
    curves = json.loads((tmp_path / "report" / "curves.json").read_text())
    # The curves agree with the point metrics of the same lists.
    assert curves["final (ranked)"]["ndcg"][9] == pytest.approx(saved["final"]["ndcg@10"], abs=1e-6)
    assert curves["baseline pop"]["hr"][49] == pytest.approx(saved["baselines"]["pop"]["hr@50"], abs=1e-6)
    assert len(curves["recall (merged)"]["hr"]) == 200


def test_rebuild_index_publishes_good_and_refuses_bad(tiny_bundle, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(tiny_bundle, root)
    before = resolve(str(root))
    report = rebuild_index(bundle=str(root), index="hnsw:m=16,ef_search=256", min_recall=0.9, k=50)
    assert report["recall_at_k"] >= 0.9
    after = load_bundle(str(root))
    assert after.path != before and after.index_spec.kind == "hnsw"
    assert after.model_version != after.index_version
    with pytest.raises(IndexRejected, match="below --min-recall .* try a higher nprobe"):
        rebuild_index(bundle=str(root), index="ivf:nlist=64,nprobe=1", min_recall=0.99, k=50)
    assert load_bundle(str(root)).path == after.path
    small = rebuild_index(bundle=str(root), index="ivf", k=50)  # a few hundred items: IVF does not pay off
    assert small["index"].startswith("flat") and "does not pay off" in small["note"] and small["recall_at_k"] == 1.0


def test_cli_reports_malformed_csv_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3,pv,100\n1,2,3,pv\n")
    code = main(["train", "--events", str(bad), "--out", str(tmp_path / "b"), "--no-progress"])
    assert code == 2
    assert f"{bad}:2: expected 5 columns, found 4" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("train", "evaluate", "rebuild-index", "serve", "recommend", "synth", "demo"):
        assert name in out


def test_evaluate_with_fewer_candidates_reports_them(tiny_bundle, tiny_log_path):
    full = evaluate(bundle=tiny_bundle, events=tiny_log_path, progress=False)
    few = evaluate(bundle=tiny_bundle, events=tiny_log_path, progress=False, candidates={"two_tower": 20, "covisit": 0, "popular": 0})
    assert few["candidates"] == {"two_tower": 20, "covisit": 0, "popular": 0, "recent": 5} != full["candidates"]
    assert "candidates: two_tower 20, covisit 0, popular 0" in format_report(few)
    # 20 candidates cannot hold the targets the full list finds beyond rank 20.
    assert few["recall"]["hr@200"] < full["recall"]["hr@200"]


def test_cli_refuses_bad_candidate_counts(tiny_bundle, tiny_log_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--bundle", tiny_bundle, "--events", tiny_log_path, "--candidates", "towers=5"])
    assert exit_.value.code == 2
    assert "--candidates: 'towers=5': expected FIELD=COUNT" in capsys.readouterr().err


def test_training_records_each_stage_and_samples(tiny_bundle):
    with open(f"{resolve(tiny_bundle)}/manifest.json") as fh:
        training = json.load(fh)["training"]
    assert set(training["stages"]) == {"read", "dataset", "two_tower", "index", "channels", "business", "ranker"}
    assert all(s["seconds"] >= 0 and s["peak_rss_gb"] > 0 for s in training["stages"].values())
    assert training["two_tower"]["samples"] > 0 and training["ranker"]["samples"] > 0 and training["budget_seconds"] is None
    assert all(e["samples_per_s"] > 0 for e in training["two_tower"]["epochs"])


def test_durations_parse_and_bad_ones_are_refused(capsys):
    assert parse_duration("90s") == 90 and parse_duration("1.5h") == 5400 and parse_duration("45m") == 2700 and parse_duration("30") == 30
    for bad in ("", "m", "-5m", "0", "inf", "5d"):
        with pytest.raises(ValueError, match="positive duration"):
            parse_duration(bad)
    with pytest.raises(SystemExit):
        main(["train", "--events", "x.csv", "--out", "b", "--budget", "soon"])
    assert "expected a positive duration" in capsys.readouterr().err


def test_demo_ends_with_three_next_commands():
    from funnel.tools.demo import next_steps

    lines = next_steps("qs", "qs/events.csv", "42").splitlines()
    commands = [line.split("#")[0].strip() for line in lines if line.startswith("  funnel ")]
    assert [c.split()[1] for c in commands] == ["evaluate", "serve", "recommend"]
    assert "--bundle qs/bundle --events qs/events.csv" in commands[0] and "--user 42" in commands[2]


def test_a_budget_gives_the_ranker_what_the_earlier_stages_left(tiny_log_path, tmp_path):
    budget = 600.0
    version = train(
        events=tiny_log_path, out=str(tmp_path), budget=budget, progress=False,
        two_tower=TwoTowerTrainConfig(epochs=1, batch_size=128, uniform_negatives=64), ranker=RankerTrainConfig(epochs=1, batch_size=128),
    )
    with open(f"{version}/manifest.json") as fh:
        training = json.load(fh)["training"]
    assert training["budget_seconds"] == budget and training["two_tower"]["config"]["max_seconds"] == budget * TWO_TOWER_SHARE
    before_ranker = sum(s["seconds"] for name, s in training["stages"].items() if name != "ranker")
    # Everything but the write share and the earlier stages' time (a second of slack for the gaps between stages).
    assert abs(training["ranker"]["config"]["max_seconds"] - (budget * (1 - WRITE_SHARE) - before_ranker)) < 1.0


def test_evaluate_scores_a_fixed_sample_of_test_users(tiny_bundle, tiny_log_path):
    first = evaluate(bundle=tiny_bundle, events=tiny_log_path, progress=False, max_users=40, seed=3)
    again = evaluate(bundle=tiny_bundle, events=tiny_log_path, progress=False, max_users=40, seed=3)
    assert first["users"] == 40 and first["test_users"] > 40
    assert first["final"] == again["final"] and first["baselines"] == again["baselines"]
    assert f"40 users (a sample of {first['test_users']:,})" in format_report(first)
