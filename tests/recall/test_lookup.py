import numpy as np

from funnel.recall.lookup import best_first_columns, merge_rows


def test_merge_rows_keeps_first_channel_and_orders_by_inner_product():
    item_vecs = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [0, 3]], np.float32)  # item 0 = padding
    user_vecs = np.array([[1, 0], [0, 1], [5, 5]], np.float32)
    ids = np.array([[2, 4, 0, 4, 1], [3, 5, 3, 0, 0], [0, 0, 0, 0, 0]], np.int64)
    tags = np.array([[1, 1, 1, 2, 3], [2, 3, 1, 0, 0], [1, 1, 1, 1, 1]], np.int8)
    out_ids, scores, channels = merge_rows(ids, tags, user_vecs, item_vecs)
    # Row 0 scores items 1, 2, 4 as 1, 0, 2; row 1 scores 3, 5 as 1, 3; row 2 is all padding.
    np.testing.assert_array_equal(out_ids, [[4, 1, 2], [5, 3, 0], [0, 0, 0]])
    np.testing.assert_array_equal(scores, np.array([[2, 1, 0], [3, 1, -np.inf], [-np.inf] * 3], np.float32))
    # Item 4 came first from channel 1, item 3 from channel 2 (its first column), padding tags 0.
    np.testing.assert_array_equal(channels, [[1, 3, 1], [3, 2, 0], [0, 0, 0]])


def test_merge_rows_breaks_ties_by_ascending_id():
    item_vecs = np.array([[0.0], [1.0], [1.0], [1.0]], np.float32)
    out_ids, scores, _ = merge_rows(np.array([[3, 1, 2]], np.int64), np.ones((1, 3), np.int8), np.ones((1, 1), np.float32), item_vecs)
    np.testing.assert_array_equal(out_ids, [[1, 2, 3]])
    assert scores.dtype == np.float32


def test_best_first_columns_sorts_stably_with_padding_last():
    items = np.array([[7, 0, 5, 9], [0, 0, 0, 0]], np.int64)
    final = np.array([[0.2, 0.9, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4]], np.float32)  # a padding column's score never counts
    heads = np.stack([final * 2, final * 3], axis=-1)  # [B, C, 2]
    recall = np.array([[1.5, -np.inf, 2.5, 3.5], [-np.inf] * 4], np.float32)
    channels = np.array([[1, 0, 2, 3], [0, 0, 0, 0]], np.int8)
    order, out_items, out_recall, out_channels, scores = best_first_columns(items, final, heads, recall, channels)
    # Items 5 and 9 tie at 0.5 and keep their column order; the padding column goes last.
    np.testing.assert_array_equal(order, [[2, 3, 0, 1], [0, 1, 2, 3]])
    np.testing.assert_array_equal(out_items, [[5, 9, 7, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out_recall[0], np.array([2.5, 3.5, 1.5, -np.inf], np.float32))
    np.testing.assert_array_equal(out_channels, [[2, 3, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(scores[0], [[0.5, 1.0, 1.5], [0.5, 1.0, 1.5], [0.2, 0.4, 0.6], [0, 0, 0]], rtol=1e-6)
    assert scores.dtype == np.float32 and not scores[1].any()
