import numpy as np

from funnel.events.dataset import Dataset
from funnel.events.readers import EventLog, ReadReport
from funnel.events.sequences import Sequences
from funnel.events.split import leave_last_out, make_split, time_split
import pandas as pd
import pytest


def seqs_of(users, items, ts, num_users):
    n = len(users)
    return Sequences.from_encoded(np.array(users), np.array(items), np.ones(n, np.int64), np.ones(n, np.int8), np.array(ts), num_users)


def test_from_encoded_groups_by_user_and_orders_by_time_stably():
    s = seqs_of([2, 1, 2, 2, 1], [10, 11, 12, 13, 14], [5, 9, 5, 1, 3], 3)
    assert s.offsets.tolist() == [0, 0, 2, 5]
    assert s.items.tolist() == [14, 11, 13, 10, 12]  # ties (ts 5) keep input order


def test_window_is_right_aligned_padded_and_stays_inside_the_user():
    s = seqs_of([1, 1, 1, 2], [5, 6, 7, 8], [1, 2, 3, 4], 3)
    w = s.user_window(np.array([1, 2, 0]), 2)
    assert w.items.tolist() == [[6, 7], [0, 8], [0, 0]]
    assert w.lengths.tolist() == [2, 1, 0]
    w = s.user_window(np.array([1]), 4, ends=np.array([2]))
    assert w.items.tolist() == [[0, 0, 5, 6]]
    assert w.tail(1).items.tolist() == [[6]]


def test_history_matrix_marks_items_before_end():
    s = seqs_of([1, 1, 1, 2], [5, 6, 5, 8], [1, 2, 3, 4], 3)
    m = s.history_matrix(np.array([1, 2]), np.array([3, 3]), 10).toarray()
    assert m[0].nonzero()[0].tolist() == [5, 6] and m[0, 5] == 1
    assert m[1].sum() == 0


def test_leave_last_out_and_train_targets():
    s = seqs_of([1] * 5 + [2] * 2, [1, 2, 3, 4, 5, 6, 7], list(range(7)), 3)
    split = leave_last_out(s)
    users, pos = split.targets("test")
    assert users.tolist() == [1] and pos.tolist() == [4]
    assert split.targets("valid")[1].tolist() == [3]
    tu, tp = split.train_targets(s)
    # user 1 trains on positions 1, 2 (3 is validation); user 2 (2 events) keeps both for training
    assert list(zip(tu.tolist(), tp.tolist())) == [(1, 1), (1, 2), (2, 6)]
    assert split.train_mask(s).tolist() == [True, True, True, False, False, True, True]


def test_time_split_uses_global_cutoffs():
    s = seqs_of([1] * 10, list(range(1, 11)), list(range(10)), 2)
    split = time_split(s, 0.2, 0.2)
    assert split.train_end[1] == 6 or split.train_end[1] == 7
    assert split.valid_pos[1] == split.train_end[1]
    assert split.test_pos[1] > split.valid_pos[1]
    with pytest.raises(ValueError):
        make_split(s, "random")


def test_dataset_round_trip(tmp_path):
    events = pd.DataFrame({"user": ["u1", "u1", "u2"], "item": ["a", "b", "a"], "category": ["c1", "c2", "c1"], "behavior": np.int8([1, 4, 1]), "ts": [3, 4, 5]})
    items = pd.DataFrame({"item": ["a", "b", "z"], "category": ["c1", "c2", "c3"], "title": ["A", "B", "Z"], "tags": ["x|y", "", "y"]})
    data = Dataset.from_log(EventLog(events, items, "x", ReadReport()))
    assert len(data.items) == 3 and data.item_title[data.items.encode(["z"])[0]] == "Z"
    data.save(str(tmp_path))
    back = Dataset.load(str(tmp_path))
    assert back.seqs.items.tolist() == data.seqs.items.tolist()
    assert back.item_category.tolist() == data.item_category.tolist()
    z = data.items.encode(["a", "z"])
    assert [list(data.tags.decode(back.item_tags[i][back.item_tags[i] > 0])) for i in z] == [["x", "y"], ["y"]]


def test_dataset_grow_keeps_ids_and_marks_the_added_events():
    import pandas as pd

    from funnel.events.dataset import Dataset
    from funnel.events.readers import EventLog, ReadReport

    def log(rows):
        events = pd.DataFrame(rows, columns=["user", "item", "category", "behavior", "ts"]).astype(
            {"user": "string[pyarrow]", "item": "string[pyarrow]", "category": "string[pyarrow]", "behavior": "int8", "ts": "int64"}
        )
        items = events.drop_duplicates("item", keep="last")[["item", "category"]].assign(title="", tags="")
        return EventLog(events, items, "mem", ReadReport(rows=len(events)))

    base = Dataset.from_log(log([("u1", "a", "c1", 0, 10), ("u1", "b", "c1", 0, 20), ("u2", "a", "c1", 0, 15)]))
    grown, fresh = base.grow(log([("u2", "n", "", 0, 30), ("u3", "b", "c1", 0, 31), ("u1", "n", "c9", 3, 25)]))
    assert list(grown.items.decode(base.items.encode(["a", "b"]))) == ["a", "b"]  # old ids unchanged
    new = grown.items.encode(["n"])[0]
    assert new == base.items.size  # appended
    assert grown.categories.decode([grown.item_category[new]])[0] == "c9"
    u1 = grown.users.encode(["u1"])[0]
    lo, hi = grown.seqs.offsets[u1], grown.seqs.offsets[u1 + 1]
    assert list(grown.items.decode(grown.seqs.items[lo:hi])) == ["a", "b", "n"]
    assert list(fresh[lo:hi]) == [False, False, True]
    assert fresh.sum() == 3 and grown.users.size == base.users.size + 1
