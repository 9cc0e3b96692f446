import os

import pandas as pd
import pytest

from funnel.events.readers import EventFormatError, read_events
from funnel.events.schema import BEHAVIOR_CODE

GOOD = "1,10,100,pv,1000\n1,11,100,cart,1001\n2,10,100,buy,1002\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_taobao_reads_rows_in_file_order(tmp_path):
    log = read_events(write(tmp_path, "ok.csv", GOOD))
    assert list(log.events["user"]) == ["1", "1", "2"]
    assert list(log.events["behavior"]) == [BEHAVIOR_CODE["pv"], BEHAVIOR_CODE["cart"], BEHAVIOR_CODE["buy"]]
    assert list(log.events["ts"]) == [1000, 1001, 1002]
    assert set(log.items["item"]) == {"10", "11"}
    assert log.report.rows == 3 and log.report.total_skipped == 0


def test_taobao_crlf_line_endings(tmp_path):
    log = read_events(write(tmp_path, "crlf.csv", GOOD.replace("\n", "\r\n")))
    assert list(log.events["ts"]) == [1000, 1001, 1002]


BAD = GOOD + "3,12,100,pv\n3,x,100,pv,5\n3,12,100,click,5\n3,12,100,pv,later\n\n4,1,2,pv,9,9\n"


def test_taobao_bad_rows_fail_with_file_line_and_reason(tmp_path):
    path = write(tmp_path, "bad.csv", BAD)
    with pytest.raises(EventFormatError) as err:
        read_events(path)
    msg = str(err.value)
    assert f"{path}:4: expected 5 columns, found 4" in msg
    assert f"{path}:5: non-numeric item_id 'x'" in msg
    assert f"{path}:6: unknown behaviour 'click'" in msg
    assert f"{path}:7: non-numeric timestamp 'later'" in msg
    assert f"{path}:8: expected 5 columns, found 1" in msg
    assert "--on-error skip" in msg


def test_taobao_skip_counts_reasons(tmp_path):
    log = read_events(write(tmp_path, "bad.csv", BAD), on_error="skip")
    assert log.report.rows == 3
    assert log.report.skipped == {"wrong column count": 3, "non-numeric item_id": 1, "unknown behaviour": 1, "non-numeric timestamp": 1}
    assert "skipped 6 bad rows" in log.report.summary()


def test_movielens_directory_with_genres(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,3.5,90\n2,1,5,120\n")
    (d / "movies.csv").write_text('movieId,title,genres\n1,"Toy Story, The (1995)",Animation|Comedy\n2,Heat (1995),Action|Crime\n')
    log = read_events(str(d), "movielens")
    assert list(log.events["category"]) == ["Animation", "Action", "Animation"]
    items = log.items.set_index("item")
    assert items.loc["1", "title"] == "Toy Story, The (1995)"
    assert (log.events["behavior"] == BEHAVIOR_CODE["pv"]).all()


def test_movielens_without_movies_and_bad_header(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,oops,90\n")
    with pytest.raises(EventFormatError, match=r"ratings.csv:3: non-numeric rating 'oops'"):
        read_events(str(d), "movielens")
    log = read_events(str(d), "movielens", on_error="skip")
    assert list(log.events["category"]) == ["unknown"]
    (d / "ratings.csv").write_text("user,item\n1,1\n")
    with pytest.raises(EventFormatError, match="ratings.csv:1: expected header"):
        read_events(str(d), "movielens")


def test_parquet_good_and_bad_rows(tmp_path):
    frame = pd.DataFrame(
        {"user_id": [1, 2, 3], "item_id": [5, 6, 7], "category_id": [1, 1, 2], "behavior_type": ["pv", "fav", "nope"], "timestamp": [10, 11, 12]}
    )
    path = str(tmp_path / "log.parquet")
    frame.to_parquet(path)
    with pytest.raises(EventFormatError, match=r"log.parquet: row 3: unknown behaviour 'nope'"):
        read_events(path, "parquet")
    log = read_events(path, "parquet", on_error="skip")
    assert list(log.events["item"]) == ["5", "6"]
    frame.drop(columns="timestamp").to_parquet(path)
    with pytest.raises(EventFormatError, match="missing columns timestamp"):
        read_events(path, "parquet")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_events(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="unknown format"):
        read_events(write(tmp_path, "ok.csv", GOOD), "json")


def test_empty_file_gives_empty_log(tmp_path):
    log = read_events(write(tmp_path, "empty.csv", ""))
    assert len(log.events) == 0 and os.path.exists(log.source)


@pytest.mark.parametrize(
    "content, message",
    [
        ("1,10,100,pv,1000\n".encode("utf-16"), "not a UTF-8 CSV: it is UTF-16 text"),
        (bytes(range(256)) * 4, "not a UTF-8 CSV: the first 1024 bytes hold NUL bytes"),
        (b"1,10,100,pv,1000\n1,\xff\xfe,100,pv,1001\n", "not a readable UTF-8 CSV"),
    ],
    ids=["utf16", "binary", "bad-utf8"],
)
def test_non_utf8_files_are_named_not_dumped(tmp_path, content, message):
    path = tmp_path / "log.csv"
    path.write_bytes(content)
    with pytest.raises(EventFormatError) as err:
        read_events(str(path))
    assert str(err.value).startswith(f"{path}: {message}") and "\\x" not in str(err.value)


def test_a_header_line_gets_a_hint(tmp_path):
    with pytest.raises(EventFormatError, match="looks like a header, but this format has none"):
        read_events(write(tmp_path, "h.csv", "user_id,item_id,category_id,behavior_type,timestamp\n" + GOOD))
    with pytest.raises(EventFormatError) as err:
        read_events(write(tmp_path, "bad.csv", "x1,10,100,pv,1000\n"))
    assert "looks like a header" not in str(err.value)  # a bad first row with numbers in it is just a bad row
