import numpy as np
import pytest

from funnel.events.sequences import Sequences, Window
from funnel.rank.business import BusinessTables
from funnel.rank.features import FeatureTables, build_features, dense_names
from funnel.rank.schema import DTYPE, check_schema, feature_schema, fit_feature_tables, register_feature, register_features, unregister
from funnel.recall.channels import CoVisitation


def test_check_schema_names_each_difference():
    code = feature_schema()
    check_schema(code)
    with pytest.raises(ValueError, match="the code lacks gone; the bundle lacks seen_buy"):
        check_schema([f for f in code if f["name"] != "seen_buy"] + [{"name": "gone", "dtype": DTYPE}])
    swapped = [code[1], code[0], *code[2:]]
    with pytest.raises(ValueError, match=f"column 0 is {code[1]['name']} in the bundle and {code[0]['name']} in the code"):
        check_schema(swapped)
    with pytest.raises(ValueError, match="dtypes other than float32: recall_score \\(float64\\)"):
        check_schema([{**code[0], "dtype": "float64"}, *code[1:]])


def test_register_appends_a_column_and_unregister_removes_it():
    before = dense_names()
    group = register_feature("toy_parity", lambda batch: batch.cand_items % 2)
    try:
        assert dense_names() == (*before, "toy_parity")
        with pytest.raises(ValueError, match="must be new"):
            register_feature("toy_parity", lambda batch: batch.cand_items)
        with pytest.raises(ValueError, match="must be new"):
            register_features(("a", "a"), lambda batch: batch.cand_items)
    finally:
        unregister(group)
    assert dense_names() == before


def _build():
    item_category = np.array([0, 1, 2, 1, 3])
    seqs = Sequences.from_encoded(np.array([0, 0]), np.array([1, 3]), item_category[[1, 3]], np.array([1, 1]), np.array([1, 2]), 1)
    mask = np.ones(len(seqs), bool)
    tables = FeatureTables(item_category, np.array([0, 1, 1, 3, 7]), BusinessTables.fit(seqs, mask, item_category), CoVisitation.count_pairs(seqs, mask, 5))
    w = Window(items=np.array([[0, 1, 2]]), categories=np.array([[0, 1, 2]]), behaviors=np.array([[0, 1, 2]]), ts=np.array([[0, 5, 6]]), lengths=np.array([2]))
    return build_features(
        w, np.array([10]), np.array([[3, 2, 0]]), np.array([[0.5, 0.2, -np.inf]], np.float32), np.array([[1, 2, 0]]), np.array([[0, 1, 2]]),
        user_activity=np.array([2]), tables=tables, num_gap_buckets=8,
    )


def test_a_registered_feature_fills_its_named_column():
    before = _build().dense
    per_pair = register_feature("toy_parity", lambda batch: batch.cand_items % 2)
    per_user = register_feature("toy_history", lambda batch: (batch.window.items > 0).sum(-1), per_user=True)
    try:
        dense = _build().dense
    finally:
        unregister(per_pair)
        unregister(per_user)
    np.testing.assert_array_equal(dense[..., : before.shape[-1]], before)  # the built-in columns are untouched
    assert dense[0, :, -2].tolist() == [1.0, 0.0, 0.0]  # item 3 odd, item 2 even, padding zeroed
    assert dense[0, :, -1].tolist() == [2.0, 2.0, 0.0]  # the user's two events, on every real candidate


def test_a_feature_of_the_wrong_shape_is_named():
    group = register_feature("toy_bad", lambda batch: batch.cand_items[:, :1])
    try:
        with pytest.raises(ValueError, match=r"feature group toy_bad returned shape \(1, 1, 1\), expected \(1, 3, 1\)"):
            _build()
    finally:
        unregister(group)


def test_only_groups_with_fit_get_fitted_tables(tiny_data):
    mask = np.ones(len(tiny_data.seqs), bool)
    plain = register_feature("toy_plain", lambda batch: batch.cand_items % 2)
    counted = register_feature("toy_counted", lambda batch: batch.cand_items, fit=lambda data, m: {"events": np.bincount(data.seqs.items[m], minlength=data.items.size)})
    try:
        fitted = fit_feature_tables(tiny_data, mask)
    finally:
        unregister(plain)
        unregister(counted)
    assert list(fitted) == ["toy_counted"]
    assert fitted["toy_counted"]["events"].sum() == len(tiny_data.seqs)
