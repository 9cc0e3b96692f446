"""Train / validation / test splits over per-user sequences.

A split never copies events: it records, per user, where training stops and which
positions are the validation and test targets. A target's history is every event of
that user before it; a multi-target test range shares the history before its first event.
"""

from dataclasses import dataclass

import numpy as np

from funnel.events.sequences import Sequences

SPLITS = ("leave-last-out", "time", "comirec")


def subsample(rng: np.random.Generator, k: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """At most ``k`` of the aligned rows of ``arrays``, drawn without replacement, kept in their order.

    Args:
        rng: random source (untouched when the rows are ``k`` or fewer).
        k: rows kept.
        arrays: equal-length arrays (e.g. users and their target positions).

    Returns:
        The arrays themselves when they have ``k`` rows or fewer, else their sampled rows.
    """
    if len(arrays[0]) <= k:
        return arrays
    pick = np.sort(rng.choice(len(arrays[0]), k, replace=False))
    return tuple(a[pick] for a in arrays)


@dataclass
class Split:
    """Per-user split positions (absolute indices into the flat sequence arrays).

    Attributes:
        kind: the split's name.
        train_end: int64 [U]; a user's training positions are ``offsets[u]:train_end[u]``.
        valid_pos: int64 [U]; the validation target's position, -1 if none.
        test_pos: int64 [U]; the test target's position, -1 if none. With ``test_end``,
            the first of the user's test targets.
        test_end: int64 [U] or None; when set, each test user's targets are the positions
            ``test_pos[u]:test_end[u]``, all scored from the history before ``test_pos[u]``.
            None means one test target per user.
    """

    kind: str
    train_end: np.ndarray
    valid_pos: np.ndarray
    test_pos: np.ndarray
    test_end: np.ndarray | None = None

    @property
    def multi_target(self) -> bool:
        """Whether a test user has a range of targets rather than one."""
        return self.test_end is not None

    def targets(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """Users with a target in ``which`` ("valid" or "test") and the target positions."""
        pos = {"valid": self.valid_pos, "test": self.test_pos}[which]
        users = np.flatnonzero(pos >= 0)
        return users, pos[users]

    def test_ranges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Users with test targets and each one's target range ``[starts, ends)`` (one position wide without ``test_end``)."""
        users, starts = self.targets("test")
        ends = starts + 1 if self.test_end is None else self.test_end[users]
        return users, starts, ends

    def train_targets(self, seqs: Sequences) -> tuple[np.ndarray, np.ndarray]:
        """Every training position that has at least one earlier event, as (users, positions)."""
        starts = seqs.offsets[:-1] + 1
        counts = np.maximum(self.train_end - starts, 0)
        users = np.repeat(np.arange(seqs.num_users), counts)
        first = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return users, first + np.arange(counts.sum())

    def train_mask(self, seqs: Sequences) -> np.ndarray:
        """bool [N]: positions inside the training part."""
        pos = np.arange(len(seqs))
        return pos < np.repeat(self.train_end, seqs.lengths)


def leave_last_out(seqs: Sequences) -> Split:
    """Last event of each user = test, second last = validation, the rest = training.

    Users with fewer than 3 events stay in training only.
    """
    starts, ends = seqs.offsets[:-1], seqs.offsets[1:]
    long = (ends - starts) >= 3
    return Split(
        kind="leave-last-out",
        train_end=np.where(long, ends - 2, ends),
        valid_pos=np.where(long, ends - 2, -1),
        test_pos=np.where(long, ends - 1, -1),
    )


def time_split(seqs: Sequences, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    """Global time cutoffs: events before the validation cutoff train; each user's first
    event after the validation cutoff (and before the test cutoff) is the validation
    target, the first event after the test cutoff is the test target.

    Args:
        seqs: the sequences to split.
        valid_fraction, test_fraction: share of all events after each cutoff.
    """
    if not (0 < valid_fraction and 0 < test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError("fractions must be positive and sum to less than 1")
    c_valid, c_test = np.quantile(seqs.ts, [1 - valid_fraction - test_fraction, 1 - test_fraction])
    ends = seqs.offsets[1:]
    first_valid = first_at_or_after(seqs, c_valid)
    first_test = first_at_or_after(seqs, c_test)
    has_valid = (first_valid < ends) & (first_valid < first_test)
    return Split(
        kind="time",
        train_end=first_valid,
        valid_pos=np.where(has_valid, first_valid, -1),
        test_pos=np.where(first_test < ends, first_test, -1),
    )


def first_at_or_after(seqs: Sequences, cutoff: float) -> np.ndarray:
    """int64 [U]: each user's first position with a timestamp at or after ``cutoff`` (its end when none)."""
    # Timestamps are sorted within a user, so the count before the cutoff is the offset.
    cum = np.concatenate([[0], np.cumsum(seqs.ts < cutoff)])
    return seqs.offsets[:-1] + cum[seqs.offsets[1:]] - cum[seqs.offsets[:-1]]


def comirec_split(seqs: Sequences, seed: int = 0, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    """ComiRec's protocol (Cen et al., KDD 2020): users, not events, are held out.

    Users with at least 2 events are shuffled and cut into train / validation / test users
    (8:1:1 by default). Train users' whole sequences train; nothing of a validation or test
    user does, so the channels and popularity see train users only. A held-out user's first
    80% of events (at least 1) are the history, the rest (at least 1) the targets: the
    test targets are the range ``test_pos:test_end``, the validation target is the first
    target only, so early stopping keeps its single-target metrics. Users with fewer than
    2 events stay in training.

    Args:
        seqs: the sequences to split.
        seed: seeds the user shuffle; training and evaluation must use the same one.
        valid_fraction, test_fraction: share of eligible users held out for each.

    Returns:
        The split, with ``test_end`` set.
    """
    if not (0 < valid_fraction and 0 < test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError("fractions must be positive and sum to less than 1")
    starts, ends = seqs.offsets[:-1], seqs.offsets[1:]
    lengths = ends - starts
    eligible = np.random.default_rng(seed).permutation(np.flatnonzero(lengths >= 2))
    n = len(eligible)
    # Cut points as in ComiRec's preprocessing: floor of the cumulative shares.
    n_train = int(n * (1 - valid_fraction - test_fraction))
    n_valid = int(n * (1 - test_fraction)) - n_train
    valid = np.zeros(seqs.num_users, dtype=bool)
    test = np.zeros(seqs.num_users, dtype=bool)
    valid[eligible[n_train : n_train + n_valid]] = True
    test[eligible[n_train + n_valid :]] = True
    # ComiRec's int(0.8 * n): for n >= 2 it leaves at least one history event and one target.
    first_target = starts + lengths * 4 // 5
    return Split(
        kind="comirec",
        train_end=np.where(valid | test, starts, ends),
        valid_pos=np.where(valid, first_target, -1),
        test_pos=np.where(test, first_target, -1),
        test_end=np.where(test, ends, -1),
    )


def make_split(seqs: Sequences, kind: str, seed: int = 0) -> Split:
    """Build the split called ``kind`` (one of :data:`SPLITS`).

    Args:
        seqs: the sequences to split.
        kind: the split's name.
        seed: seeds the splits that draw at random (``comirec``).

    Returns:
        The split.
    """
    if kind == "leave-last-out":
        return leave_last_out(seqs)
    if kind == "time":
        return time_split(seqs)
    if kind == "comirec":
        return comirec_split(seqs, seed)
    raise ValueError(f"unknown split {kind!r}; expected one of {', '.join(SPLITS)}")
