import argparse
import os

import numpy as np
import pandas as pd
import pytest

from funnel.events import synth
from funnel.events.readers import read_events
from funnel.events.schema import BEHAVIORS, TAOBAO_COLUMNS
from funnel.events.synth import SynthConfig, SynthStats, add_arguments, generate, run

TINY = SynthConfig(n_users=300, n_items=2_000, n_categories=20, seed=0)


def _read(path: str) -> pd.DataFrame:
    return pd.read_csv(path, header=None, names=list(TAOBAO_COLUMNS))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, SynthStats, pd.DataFrame]:
    path = str(tmp_path_factory.mktemp("synth") / "log.csv")
    stats = generate(path, TINY, progress=False)
    return path, stats, _read(path)


def _same_user_as_next(df: pd.DataFrame) -> np.ndarray:
    users = df["user_id"].to_numpy()
    return users[1:] == users[:-1]


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path, tiny):
    path, _, _ = tiny
    again, other = str(tmp_path / "again.csv"), str(tmp_path / "other.csv")
    generate(again, TINY, progress=False)
    generate(other, SynthConfig(n_users=300, n_items=2_000, n_categories=20, seed=1), progress=False)
    with open(path, "rb") as a, open(again, "rb") as b, open(other, "rb") as c:
        first = a.read()
        assert first == b.read()
        assert first != c.read()


def test_format_is_headerless_taobao_csv(tiny):
    path, _, df = tiny
    with open(path) as f:
        lines = f.read().splitlines()
    assert all(len(line.split(",")) == 5 for line in lines)
    assert lines[0].split(",")[0].isdigit()
    assert set(df["behavior_type"]) <= set(BEHAVIORS)
    for col in ("user_id", "item_id", "category_id", "timestamp"):
        assert pd.api.types.is_integer_dtype(df[col])
    end = TINY.start_ts + TINY.days * 86_400
    assert df["timestamp"].between(TINY.start_ts, end - 1).all()


def test_users_are_contiguous_and_time_ordered(tiny):
    _, _, df = tiny
    same = _same_user_as_next(df)
    assert (np.diff(df["user_id"].to_numpy()) >= 0).all()
    assert (np.diff(df["timestamp"].to_numpy())[same] >= 0).all()
    assert df.groupby("user_id").size().min() >= synth.MIN_EVENTS
    assert df["user_id"].nunique() == TINY.n_users


def test_every_item_has_one_category(tiny):
    _, _, df = tiny
    assert (df.groupby("item_id")["category_id"].nunique() == 1).all()


def test_stats_match_the_file(tiny):
    path, stats, df = tiny
    assert stats.path == path
    assert stats.rows == len(df)
    assert stats.users == df["user_id"].nunique()
    assert stats.items_seen == df["item_id"].nunique()
    assert stats.categories_seen == df["category_id"].nunique()
    assert stats.behaviours == {b: int((df["behavior_type"] == b).sum()) for b in BEHAVIORS}


def test_reader_accepts_the_log(tiny):
    path, stats, _ = tiny
    log = read_events(path, "taobao")
    assert log.report.total_skipped == 0
    assert log.report.rows == stats.rows


def test_next_event_mostly_stays_in_the_category(tiny):
    _, _, df = tiny
    cats = df["category_id"].to_numpy()
    same_category = (cats[1:] == cats[:-1])[_same_user_as_next(df)].mean()
    # Chance would be about 1 / n_categories = 0.05.
    assert same_category > 0.5


def test_item_popularity_is_skewed(tiny):
    _, _, df = tiny
    counts = df["item_id"].value_counts().to_numpy()
    top = counts[: max(1, len(counts) // 10)].sum()
    assert top / counts.sum() > 0.4


def test_covisitation_beats_popularity_on_the_last_event(tiny):
    _, _, df = tiny
    items = df["item_id"].to_numpy()
    same = _same_user_as_next(df)
    is_last = np.r_[~same, True]
    # Successor counts come only from pairs whose second event is not a user's last one.
    train = same & ~is_last[1:]
    pairs = pd.DataFrame({"prev": items[:-1][train], "next": items[1:][train]})
    best_next = pairs.value_counts().reset_index().drop_duplicates("prev").set_index("prev")["next"]
    most_popular = pd.Series(items[~is_last]).value_counts().index[0]

    last = np.flatnonzero(is_last)
    last = last[(last > 0) & same[np.maximum(last - 1, 0)]]
    prev, target = items[last - 1], items[last]
    covisit_hits = (best_next.reindex(prev).to_numpy() == target).mean()
    popular_hits = (target == most_popular).mean()
    assert covisit_hits > popular_hits
    assert covisit_hits > 0.1


def test_behaviour_shares_are_taobao_like(tiny):
    _, stats, _ = tiny
    share = {b: n / stats.rows for b, n in stats.behaviours.items()}
    assert share["pv"] == max(share.values())
    assert 0 < share["buy"] == min(share.values())
    assert 0.85 < share["pv"] < 0.93
    assert 0.03 < share["cart"] < 0.08
    assert 0.015 < share["fav"] < 0.05
    assert 0.01 < share["buy"] < 0.035


def test_drift_spreads_users_over_more_categories(tmp_path):
    def categories_per_user(drift: float) -> float:
        path = str(tmp_path / f"drift{drift}.csv")
        generate(path, SynthConfig(n_users=200, n_items=2_000, n_categories=50, drift=drift), progress=False)
        return _read(path).groupby("user_id")["category_id"].nunique().mean()

    assert categories_per_user(1.0) > 1.5 * categories_per_user(0.0)


def test_write_is_atomic(tmp_path):
    path = tmp_path / "log.csv"
    generate(str(path), TINY, progress=False)
    assert not os.path.exists(str(path) + ".tmp")
    assert sorted(os.listdir(tmp_path)) == ["log.csv"]


def test_failed_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    path.write_text("old\n")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synth.pcsv, "write_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        generate(str(path), TINY, progress=False)
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["log.csv"]


@pytest.mark.parametrize(
    "changes",
    [{"n_items": 5, "n_categories": 10}, {"n_users": 0}, {"drift": 1.5}, {"events_per_user": 0}, {"interests_per_user": 0}],
)
def test_impossible_configs_are_rejected(changes):
    with pytest.raises(ValueError):
        SynthConfig(**changes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funnel synth")
    add_arguments(parser)
    return parser


def test_cli_writes_the_log_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "cli.csv"
    args = _parser().parse_args(["--out", str(out), "--users", "50", "--items", "500", "--categories", "10", "--seed", "3", "--no-progress"])
    assert run(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    assert printed[0].startswith("wrote ") and str(out) in printed[0]
    assert _read(str(out))["user_id"].nunique() == 50


def test_cli_rejects_impossible_options(tmp_path, capsys):
    args = _parser().parse_args(["--out", str(tmp_path / "x.csv"), "--items", "5", "--categories", "10"])
    assert run(args) == 2
    assert "n_items" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_cli_help_explains_the_planted_structure():
    text = _parser().format_help()
    assert "Planted structure" in text
    assert "--events-per-user" in text


def test_new_items_appear_only_in_the_later_half_and_shift_changes_the_log(tmp_path, tiny):
    _, _, base = tiny
    cfg = SynthConfig(n_users=300, n_items=2_000, n_categories=20, seed=0, new_items=0.4, taste_shift=0.8)
    path = str(tmp_path / "change.csv")
    generate(path, cfg, progress=False)
    df = _read(path)
    mid = cfg.start_ts + cfg.days * 86_400 // 2
    first_seen = df.groupby("item_id")["timestamp"].min()
    base_first = base.groupby("item_id")["timestamp"].min()
    # Items the unchanged log has in its first half but this one only in its second: the released ones.
    late = first_seen[first_seen >= mid].index.intersection(base_first[base_first < mid].index)
    assert len(late) > 0.1 * len(base_first)
    assert len(df) < len(base)  # views before an item's release are not written
    # Taste shift: the category mix of the second half moves away from the first half's more than without it.
    def moved(frame):
        half = frame["timestamp"] >= mid
        a = frame[~half]["category_id"].value_counts(normalize=True)
        b = frame[half]["category_id"].value_counts(normalize=True)
        return float(a.subtract(b, fill_value=0).abs().sum())
    assert moved(df) > moved(base)
