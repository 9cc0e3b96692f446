"""Business features on a hand-computed tiny log."""

import numpy as np
import pytest

from funnel.events.sequences import Sequences, Window
from funnel.rank.business import ITEM_FEATURES, USER_FEATURES, BusinessTables, user_business_features

PV, CART, FAV, BUY = 1, 2, 3, 4
S = 20.0  # the smoothing weight in rank.business

# user, item, behaviour, ts; items 1 and 2 are in category 1, item 3 in category 2.
EVENTS = [
    (0, 1, PV, 10), (0, 1, CART, 20), (0, 1, BUY, 30), (0, 2, PV, 40),
    (1, 1, PV, 10), (1, 1, BUY, 15), (1, 1, BUY, 50), (1, 3, CART, 60),
    (2, 2, PV, 5), (2, 2, CART, 6), (2, 3, PV, 100),
]
ITEM_CATEGORY = np.array([0, 1, 1, 2])


@pytest.fixture
def tables() -> BusinessTables:
    u, i, b, t = (np.array(col) for col in zip(*EVENTS))
    seqs = Sequences.from_encoded(u, i, ITEM_CATEGORY[i], b, t, 3)
    return BusinessTables.fit(seqs, np.ones(len(seqs), bool), ITEM_CATEGORY)


def shrunk(hits, trials, g):
    return (hits + S * g) / (trials + S)


def test_item_and_category_funnel_rates(tables):
    f = dict(zip(ITEM_FEATURES, tables.item_features(np.array([1, 2, 3, 0])).T))
    # views floor at the buys: item 1 has 2 pv and 3 buys → 3 views; items 2, 3: pv 2 and 1, no buys.
    g_conv = 3 / (3 + 2 + 1)
    np.testing.assert_allclose(f["item_conversion"], [shrunk(3, 3, g_conv), shrunk(0, 2, g_conv), shrunk(0, 1, g_conv), 0], rtol=1e-6)
    # carts+favs: item 1: 1 (views max(2, 1) = 2), item 2: 1 (2), item 3: 1 (max(1, 1) = 1).
    g_cf = 3 / 5
    np.testing.assert_allclose(f["item_cart_fav_rate"], [shrunk(1, 2, g_cf), shrunk(1, 2, g_cf), shrunk(1, 1, g_cf), 0], rtol=1e-6)
    # carted pairs: (1, u0) bought, (2, u2) not, (3, u1) not.
    g_wish = 2 / 3
    np.testing.assert_allclose(f["item_wishlist"], [shrunk(0, 1, g_wish), shrunk(1, 1, g_wish), shrunk(1, 1, g_wish), 0], rtol=1e-6)
    # buyers of item 1: u0 once, u1 twice; items without buyers take the global rate.
    np.testing.assert_allclose(f["item_repurchase"], [shrunk(1, 2, 0.5), 0.5, 0.5, 0], rtol=1e-6)
    np.testing.assert_allclose(f["item_users"], np.log1p([2, 2, 2, 0]) / 10, rtol=1e-6)
    # category 1 = items 1 and 2: pv 4, buys 3, carts 2; category 2 = item 3.
    np.testing.assert_allclose(f["category_conversion"][:3], [shrunk(3, 4, 3 / 5)] * 2 + [shrunk(0, 1, 3 / 5)], rtol=1e-6)
    np.testing.assert_allclose(f["category_cart_fav_rate"][:3], [shrunk(2, 4, 3 / 5)] * 2 + [shrunk(1, 1, 3 / 5)], rtol=1e-6)


def test_only_masked_events_count():
    u, i, b, t = (np.array(col) for col in zip(*EVENTS))
    seqs = Sequences.from_encoded(u, i, ITEM_CATEGORY[i], b, t, 3)
    mask = seqs.items != 1  # drop every item-1 event
    tables = BusinessTables.fit(seqs, mask, ITEM_CATEGORY)
    f = dict(zip(ITEM_FEATURES, tables.item_features(np.array([1]))[0]))
    assert all(v == 0 for k, v in f.items() if k.startswith("item_"))
    assert f["category_conversion"] == 0.0  # item 2, left in category 1, was never bought
    assert tables.popularity(np.array([[1]]), np.array([1000]))[0, 0, -1] == 0


def test_time_aware_popularity_counts_only_earlier_events(tables):
    pop = tables.popularity(np.array([[1, 2, 3, 0]]), np.array([45]))
    # before t=45: item 1 has 5 events, item 2 has 3, item 3 none; 8 events in all, all within a day.
    share = np.array([5, 3, 0]) / 8
    for w in range(3):
        np.testing.assert_allclose(pop[0, :3, w], np.log1p(1e4 * share) / 10, rtol=1e-6)
    np.testing.assert_allclose(pop[0, :3, 3], np.log1p([5, 3, 0]) / 10, rtol=1e-6)
    assert pop[0, 3].tolist() == [0, 0, 0, 0]  # padding
    # A request at t=10 sees only the events at t=5 and t=6 (item 2): strictly earlier.
    np.testing.assert_allclose(tables.popularity(np.array([[1, 2]]), np.array([10]))[0, :, 3], np.log1p([0, 2]) / 10)


def test_popularity_at_the_fixed_time_reads_the_same_numbers(tables):
    items = np.array([[1, 2, 3, 0, 99], [3, 3, 1, 2, 0]])
    at45, at70 = tables.popularity(items, np.array([45, 45])), tables.popularity(items, np.array([45, 70]))
    tables.fix_time(45)
    np.testing.assert_array_equal(tables.popularity(items, np.array([45, 45])), at45)
    np.testing.assert_array_equal(tables.popularity(items, np.array([45, 70])), at70)  # other times: computed as before
    assert not np.array_equal(at45[1], at70[1])


def test_ids_past_the_table_read_as_padding(tables):
    assert (tables.item_features(np.array([99])) == 0).all()
    assert (tables.popularity(np.array([[99]]), np.array([1000])) == 0).all()


def test_user_features_from_the_window():
    hour = 3600
    w = Window(
        items=np.array([[0, 1, 1, 1, 3]]),
        categories=np.array([[0, 1, 1, 1, 2]]),
        behaviors=np.array([[0, PV, BUY, BUY, CART]]),
        ts=np.array([[0, 10, 15, 50, 60]]),
        lengths=np.array([4]),
    )
    f = dict(zip(USER_FEATURES, user_business_features(w, np.array([60 + 2 * hour]))[0]))
    assert f["user_cart_wishlist"] == 1.0  # the one cart (item 3) was never bought
    assert f["user_repurchase"] == 0.5  # the second buy of item 1 repeats the first
    assert f["user_buy_share"] == 0.5
    assert f["user_days_active"] == pytest.approx(1 / 30)
    assert f["user_idle"] == pytest.approx(np.log1p(2.0) / 10)
    assert [f[f"user_last_{b}"] for b in ("pv", "cart", "fav", "buy")] == [0, 1, 0, 0]
    empty = Window(*(np.zeros((1, 5), np.int64) for _ in range(4)), lengths=np.array([0]))
    assert (user_business_features(empty, np.array([100])) == 0).all()


def test_save_load_round_trip_and_bad_file(tables, tmp_path):
    path = str(tmp_path / "business.npz")
    tables.save(path)
    back = BusinessTables.load(path)
    np.testing.assert_array_equal(back.item, tables.item)
    np.testing.assert_array_equal(back.event_keys, tables.event_keys)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        BusinessTables.load(str(tmp_path / "bad.npz"))
