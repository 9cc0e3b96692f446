"""Train / validation / test splits over per-user sequences.

A split never copies events: it records, per user, where training stops and which
positions are the validation and test targets. A target's history is every event of
that user before it.
"""

from dataclasses import dataclass

import numpy as np

from events.sequences import Sequences

SPLITS = ("leave-last-out", "time")


@dataclass
class Split:
    """Per-user split positions (absolute indices into the flat sequence arrays).

    Attributes:
        kind: the split's name.
        train_end: int64 [U]; a user's training positions are ``offsets[u]:train_end[u]``.
        valid_pos: int64 [U]; the validation target's position, -1 if none.
        test_pos: int64 [U]; the test target's position, -1 if none.
    """

    kind: str
    train_end: np.ndarray
    valid_pos: np.ndarray
    test_pos: np.ndarray

    def targets(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """Users with a target in ``which`` ("valid" or "test") and the target positions."""
        pos = {"valid": self.valid_pos, "test": self.test_pos}[which]
        users = np.flatnonzero(pos >= 0)
        return users, pos[users]

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
    starts, ends = seqs.offsets[:-1], seqs.offsets[1:]
    first_valid = _first_at_or_after(seqs, c_valid)
    first_test = _first_at_or_after(seqs, c_test)
    has_valid = (first_valid < ends) & (first_valid < first_test)
    return Split(
        kind="time",
        train_end=first_valid,
        valid_pos=np.where(has_valid, first_valid, -1),
        test_pos=np.where(first_test < ends, first_test, -1),
    )


def _first_at_or_after(seqs: Sequences, cutoff: float) -> np.ndarray:
    # Timestamps are sorted within a user, so the count before the cutoff is the offset.
    cum = np.concatenate([[0], np.cumsum(seqs.ts < cutoff)])
    return seqs.offsets[:-1] + cum[seqs.offsets[1:]] - cum[seqs.offsets[:-1]]


def make_split(seqs: Sequences, kind: str) -> Split:
    """Build the split called ``kind`` (one of :data:`SPLITS`)."""
    if kind == "leave-last-out":
        return leave_last_out(seqs)
    if kind == "time":
        return time_split(seqs)
    raise ValueError(f"unknown split {kind!r}; expected one of {', '.join(SPLITS)}")
