import numpy as np
import pytest

from funnel.events.sequences import Sequences
from funnel.events.split import comirec_split, make_split, subsample


def seqs_with_lengths(lengths: list[int]) -> Sequences:
    users = np.repeat(np.arange(len(lengths)), lengths)
    n = len(users)
    return Sequences.from_encoded(users, np.arange(1, n + 1), np.ones(n, np.int64), np.ones(n, np.int8), np.arange(n), len(lengths))


@pytest.fixture
def seqs() -> Sequences:
    # 1000 users with 1 to 12 events; user 0 has none (the padding user).
    lengths = [0] + list(np.random.default_rng(3).integers(1, 13, size=999))
    return seqs_with_lengths(lengths)


def partition(split, seqs: Sequences) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    valid, test = np.flatnonzero(split.valid_pos >= 0), np.flatnonzero(split.test_pos >= 0)
    train = np.flatnonzero(split.train_end > seqs.offsets[:-1])
    return train, valid, test


def test_users_are_split_8_1_1_disjoint_and_deterministic(seqs):
    split = make_split(seqs, "comirec", seed=5)
    train, valid, test = partition(split, seqs)
    eligible = int((seqs.lengths >= 2).sum())
    short = np.flatnonzero(seqs.lengths == 1)
    assert len(valid) == int(eligible * 0.9) - int(eligible * 0.8)
    assert len(test) == eligible - int(eligible * 0.9)
    assert len(train) == int(eligible * 0.8) + len(short)
    assert not (set(train) & set(valid) or set(train) & set(test) or set(valid) & set(test))
    assert set(short) <= set(train)
    again = comirec_split(seqs, seed=5)
    assert np.array_equal(again.test_pos, split.test_pos) and np.array_equal(again.valid_pos, split.valid_pos)
    assert not np.array_equal(comirec_split(seqs, seed=6).test_pos, split.test_pos)


def test_only_train_users_train(seqs):
    split = comirec_split(seqs)
    train, valid, test = partition(split, seqs)
    users, positions = split.train_targets(seqs)
    assert set(users.tolist()) <= set(train.tolist())
    mask = split.train_mask(seqs)
    held_out = np.isin(seqs.user_positions(), np.concatenate([valid, test]))
    assert not (mask & held_out).any()
    # Train users keep every event.
    assert mask[np.isin(seqs.user_positions(), train)].all()


def test_test_ranges_are_the_last_fifth_after_the_history(seqs):
    split = comirec_split(seqs)
    assert split.multi_target
    users, starts, ends = split.test_ranges()
    n = seqs.lengths[users]
    history = starts - seqs.offsets[users]
    assert (history >= 1).all() and (ends - starts >= 1).all()
    assert np.array_equal(ends, seqs.offsets[users + 1])
    assert np.array_equal(history, n * 4 // 5)
    # The targets are at most 20% of the sequence, rounded up.
    assert (ends - starts <= np.ceil(n * 0.2)).all()


def test_validation_target_is_the_first_after_the_history(seqs):
    split = comirec_split(seqs)
    users, pos = split.targets("valid")
    assert np.array_equal(pos - seqs.offsets[users], seqs.lengths[users] * 4 // 5)


def test_hand_example_two_events_and_five_events():
    # 11 eligible users split int(11 * 0.8) = 8 train, int(11 * 0.9) - 8 = 1 validation, 2 test.
    # Seed 12 happens to draw the 2-event user (10) as a test user.
    s = seqs_with_lengths([5] * 10 + [2])
    split = comirec_split(s, seed=12)
    users, starts, ends = split.test_ranges()
    assert len(users) == 2 and 10 in users and len(split.targets("valid")[0]) == 1
    for u, lo, hi in zip(users, starts, ends):
        first = s.offsets[u]
        assert (lo - first, hi - first) == ((4, 5) if s.lengths[u] == 5 else (1, 2))


def test_single_target_splits_have_one_wide_test_ranges(seqs):
    split = make_split(seqs, "leave-last-out")
    users, starts, ends = split.test_ranges()
    assert not split.multi_target and np.array_equal(ends, starts + 1)
    assert np.array_equal(starts, split.targets("test")[1])


def test_subsample_keeps_aligned_rows_in_order_and_leaves_small_sets_alone():
    users, pos = np.arange(10) * 3, np.arange(10) + 100
    u, p = subsample(np.random.default_rng(0), 4, users, pos)
    assert len(u) == 4 and (np.diff(u) > 0).all() and (p == u // 3 + 100).all()
    small = subsample(np.random.default_rng(0), 10, users, pos)
    assert small[0] is users and small[1] is pos
