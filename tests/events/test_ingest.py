import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from funnel.events.dataset import Dataset
from funnel.events.ingest import TAOBAO_SCHEMA, ingest
from funnel.events.readers import EventFormatError, read_events
from funnel.tools.cli import main

GOOD = "1,10,100,pv,1000\n1,11,100,cart,1001\n2,10,100,buy,1002\n"
BAD = GOOD + "3,12,100,pv\n3,x,100,pv,5\n007,12,100,pv,6\n3,12,100,click,5\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_ingested_log_encodes_like_the_csv(tiny_log_path, tmp_path):
    out = str(tmp_path / "events.parquet")
    report = ingest(events=tiny_log_path, out=out)
    assert pq.read_schema(out).remove_metadata().equals(TAOBAO_SCHEMA)
    csv, parquet = read_events(tiny_log_path), read_events(out, "parquet")
    assert report.read.rows == len(csv.events) == len(parquet.events) > 0
    assert parquet.events["user"].dtype == np.int64  # integer ids: no string per row
    a, b = Dataset.from_log(csv), Dataset.from_log(parquet)
    for vocab in ("users", "items", "categories"):
        ids = np.arange(getattr(a, vocab).size)
        assert list(getattr(a, vocab).decode(ids)) == list(getattr(b, vocab).decode(ids))
    for name in ("offsets", "items", "categories", "behaviors", "ts"):
        np.testing.assert_array_equal(getattr(a.seqs, name), getattr(b.seqs, name))
    np.testing.assert_array_equal(a.item_category, b.item_category)
    assert list(b.encode_log(csv).items) == list(a.seqs.items)  # string ids encode with an integer-fitted vocabulary
    assert report.bytes_out < report.bytes_in and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_bad_rows_fail_with_file_line_and_leave_no_output(tmp_path):
    path, out = write(tmp_path, "bad.csv", BAD), str(tmp_path / "out.parquet")
    with pytest.raises(EventFormatError) as err:
        ingest(events=path, out=out)
    assert f"{path}:4: expected 5 columns, found 4" in str(err.value)
    assert f"{path}:6: user_id not storable as an integer (leading zero or over 18 digits) '007'" in str(err.value)
    assert os.listdir(tmp_path) == ["bad.csv"]


def test_skip_drops_and_counts_bad_rows(tmp_path):
    out = str(tmp_path / "out.parquet")
    report = ingest(events=write(tmp_path, "bad.csv", BAD), out=out, on_error="skip")
    assert report.read.rows == 3 and report.read.total_skipped == 4
    assert list(read_events(out, "parquet").events["user"]) == [1, 1, 2]


def test_movielens_keeps_genre_categories(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,3.5,90\n")
    (d / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n2,Heat (1995),Action|Crime\n")
    out = str(tmp_path / "ml.parquet")
    ingest(events=str(d), out=out, fmt="movielens")
    assert list(read_events(out, "parquet").events["category"]) == ["Animation", "Action"]


def test_cli_reports_and_names_the_next_step(tmp_path, capsys):
    out = str(tmp_path / "e.parquet")
    assert main(["ingest", write(tmp_path, "ok.csv", GOOD), "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "read 3 rows, none skipped" in printed and f"--events {out} --format parquet" in printed
    assert main(["ingest", str(tmp_path / "missing.csv"), "--out", out]) == 2


def test_integer_log_with_a_string_catalogue(tmp_path):
    out = str(tmp_path / "e.parquet")
    ingest(events=write(tmp_path, "ok.csv", GOOD), out=out)
    catalogue = pd.DataFrame({"item": ["12", "10"], "category": ["200", "100"], "title": ["New", "Old"], "tags": ["a|b", ""]})
    data = Dataset.from_log(read_events(out, "parquet"), catalogue)
    assert list(data.items.decode(np.arange(1, data.items.size))) == ["10", "11", "12"]
    assert data.item_listed.tolist() == [False, True, False, True] and data.item_tags.shape == (4, 2)
    assert data.categories.decode(data.item_category[3:]).tolist() == ["200"]
