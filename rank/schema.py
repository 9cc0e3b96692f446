"""The ranker's dense features by name: the registry that orders them, and the extension point for new ones.

A feature group computes one or more named float columns for every (user, candidate)
pair of a batch. The registry's order is the column order of the ranker's ``dense``
input, and the ranker's input width is its length. A bundle records the names and
dtypes (:func:`feature_schema`), and loading refuses a bundle whose list differs from
the code's (:func:`check_schema`), since its ranker would read every column after the
difference as another feature.

Adding a feature is one call, for example in the module that computes it::

    register_feature("item_id_parity", lambda batch: batch.cand_items % 2)

A feature that needs statistics of the log (a business feature: a rate per item, say)
also gives ``fit``: it gets the encoded log and the training positions and returns named
arrays. Training fits them (on the events before each ranker training example, as for
the built-in business tables), the bundle stores them, and ``compute`` finds them in
``batch.tables.fitted[name]``, ``name`` being the group's first column.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from funnel.events.dataset import Dataset
from funnel.events.sequences import Window

DTYPE = "float32"
"""The dtype of every dense column (what the manifest records)."""


@dataclass(frozen=True)
class FeatureBatch:
    """What a feature reads: one batch of users and their candidates.

    Attributes:
        window: the users' recent behaviour, [B, L].
        now: [B] request times.
        cand_items, cand_scores, cand_channels, cand_categories: [B, C] candidates, their
            recall scores, channels and categories (padding: item 0).
        cand_ranks: [B, C] each candidate's position in the recall-ordered list (0 = best).
        real: bool [B, C], False for padding.
        user_activity: [B] events in each user's whole history.
        tables: the bundle's statistics (:class:`rank.features.FeatureTables`).
    """

    window: Window
    now: np.ndarray
    cand_items: np.ndarray
    cand_scores: np.ndarray
    cand_channels: np.ndarray
    cand_categories: np.ndarray
    cand_ranks: np.ndarray
    real: np.ndarray
    user_activity: np.ndarray
    tables: Any


@dataclass(frozen=True)
class FeatureGroup:
    """Named dense columns computed together (they share their intermediate arrays).

    Attributes:
        names: the columns, in order.
        compute: batch -> float array [B, C, len(names)], or [B, len(names)] when ``per_user``.
        per_user: the columns describe the user alone and are repeated for every candidate.
        fit: (encoded log, bool [N] training positions) -> named arrays the group reads
            as ``batch.tables.fitted[names[0]]``; None for a group that needs none.
    """

    names: tuple[str, ...]
    compute: Callable[[FeatureBatch], np.ndarray]
    per_user: bool = False
    fit: Callable[[Dataset, np.ndarray], dict[str, np.ndarray]] | None = None


_GROUPS: list[FeatureGroup] = []


def register_features(
    names: Sequence[str], compute: Callable[[FeatureBatch], np.ndarray], *, per_user: bool = False, fit: Callable[[Dataset, np.ndarray], dict[str, np.ndarray]] | None = None
) -> FeatureGroup:
    """Add a group of dense columns after the registered ones.

    Args:
        names: the new columns' names, distinct from every registered name.
        compute: batch -> [B, C, len(names)] (or [B, len(names)] with ``per_user``).
        per_user, fit: see :class:`FeatureGroup`.

    Returns:
        The group, for :func:`unregister`.

    Raises:
        ValueError: a name is empty or already registered.
    """
    names = tuple(names)
    taken = set(dense_names())
    clash = [n for n in names if n in taken or not n]
    if clash or len(set(names)) != len(names):
        raise ValueError(f"feature names must be new, distinct and non-empty; {clash or names} are not")
    group = FeatureGroup(names, compute, per_user, fit)
    _GROUPS.append(group)
    return group


def register_feature(
    name: str, compute: Callable[[FeatureBatch], np.ndarray], *, per_user: bool = False, fit: Callable[[Dataset, np.ndarray], dict[str, np.ndarray]] | None = None
) -> FeatureGroup:
    """Add one dense column: ``compute`` returns [B, C] (or [B] with ``per_user``). See :func:`register_features`."""
    return register_features((name,), lambda batch: np.asarray(compute(batch))[..., None], per_user=per_user, fit=fit)


def fit_feature_tables(data: Dataset, mask: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Every registered group's own statistics, fitted on the positions of ``data.seqs`` where ``mask`` is set.

    Returns:
        first column name -> the group's named arrays, for the groups that have ``fit``.
    """
    return {group.names[0]: {k: np.asarray(v) for k, v in group.fit(data, mask).items()} for group in _GROUPS if group.fit is not None}


def unregister(group: FeatureGroup) -> None:
    """Remove a registered group (a test's, or a plugin being unloaded)."""
    _GROUPS.remove(group)


def groups() -> tuple[FeatureGroup, ...]:
    """The registered groups, in column order."""
    return tuple(_GROUPS)


def dense_names() -> tuple[str, ...]:
    """Every dense column's name, in order: the ranker's ``dense`` input is [B, C, len(dense_names())]."""
    return tuple(name for group in _GROUPS for name in group.names)


def feature_schema() -> list[dict[str, str]]:
    """The dense columns as the manifest records them: ``[{"name": ..., "dtype": "float32"}, ...]``."""
    return [{"name": name, "dtype": DTYPE} for name in dense_names()]


def check_schema(recorded: list[dict[str, str]]) -> None:
    """Refuse a recorded schema that differs from the code's.

    Args:
        recorded: a bundle's ``rank_features``.

    Raises:
        ValueError: naming the features only the bundle has, only the code has, the
            first column where the order differs, or a dtype that is not :data:`DTYPE`.
    """
    bundle = [f["name"] for f in recorded]
    code = list(dense_names())
    problems = []
    if missing := [n for n in bundle if n not in code]:
        problems.append(f"the code lacks {', '.join(missing)}")
    if extra := [n for n in code if n not in bundle]:
        problems.append(f"the bundle lacks {', '.join(extra)}")
    if not problems and bundle != code:
        at = next(i for i, (a, b) in enumerate(zip(bundle, code)) if a != b)
        problems.append(f"column {at} is {bundle[at]} in the bundle and {code[at]} in the code")
    if odd := [f"{f['name']} ({f['dtype']})" for f in recorded if f.get("dtype") != DTYPE]:
        problems.append(f"dtypes other than {DTYPE}: {', '.join(odd)}")
    if problems:
        raise ValueError(f"ranking features differ from this code's: {'; '.join(problems)}; retrain the bundle with this code, or load it with the code it was trained with")
