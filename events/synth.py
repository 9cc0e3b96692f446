"""Synthetic behaviour logs in the Taobao UserBehavior CSV format, with planted structure.

The log is headerless ``user_id,item_id,category_id,behavior_type,timestamp`` lines,
grouped by user and time-ordered within a user, like the real file. What is planted,
so that later stages have something to learn and tests something to measure:

* Catalogue: every item belongs to one category (uneven category sizes); inside a
  category item popularity follows a power law (head and tail items). Item and
  category ids are random distinct integers, so ids reveal nothing.
* Interests: each user cares about a few categories (with weights). Activity comes
  in sessions (views minutes apart, sessions hours or days apart); a session
  focuses on one current interest, and before each session one interest may drift
  to a new category.
* Sequences: each category is cut into small item neighbourhoods arranged as rings.
  The next view is often the ring successor of the previous item, another item of
  its neighbourhood, or the same item again, so co-visitation and sequence models
  beat popularity, and order matters (successor, not predecessor).
* Funnel: most events are views (pv); a view may be followed by cart and fav on the
  same item, a cart by buy (roughly 89% / 5.5% / 3% / 2%); repeat views convert more.
* Noise: a small share of views go to uniformly random items.
* Change over time (off by default): a share of the catalogue can be released during
  the later half of the window, each item getting no events before its release, and
  interests that drift can move towards a reshuffled category popularity, so the
  population's tastes shift. A model frozen on the early part misses both.

Users are generated in fixed-size chunks with vectorised numpy and streamed to disk,
so memory stays flat however many rows are written; the same config always gives the
same bytes.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
from tqdm import tqdm

from funnel.events.schema import BEHAVIORS, TAOBAO_COLUMNS

USERS_PER_CHUNK = 10_000
"""Part of the output format: changing it changes which random numbers each user gets."""

MIN_EVENTS = 5
NEIGHBOURHOOD_SIZE = 8
RING_POPULARITY_JITTER = 1.0
"""Sigma of the lognormal factor on popularity rank that decides who shares a ring."""
SESSION_MEAN_VIEWS = 8.0
COUNT_SIGMA = 0.9
ID_SPREAD = 5
"""Ids are drawn from a range this many times the count, so they are sparse like Taobao's."""

VIEW_GAP_MEAN_S = 90.0
ACTION_GAP_MEAN_S = 20.0
SESSION_TAIL_S = 3_600
"""No session starts this close to the window's end, so few get cut off there."""

# How each view after a session's first is chosen (the first is always FRESH).
FRESH, OTHER, NOISE, NEXT, NEIGHBOUR, REPEAT = range(6)
KIND_PROBS = np.array([0.30, 0.08, 0.02, 0.35, 0.15, 0.10])
"""FRESH: popular item of the session's focus category; OTHER: of another current
interest; NOISE: any item; NEXT: ring successor of the previous item; NEIGHBOUR: any
item of its neighbourhood; REPEAT: the same item."""

PV_SHARE, CART_SHARE, FAV_SHARE, BUY_SHARE = 0.89, 0.055, 0.03, 0.02
REPEAT_INTENT = 3.0
"""How much likelier a repeat view is to lead to cart or fav than a first view."""

_PV, _CART, _FAV, _BUY = (np.int8(BEHAVIORS.index(b)) for b in ("pv", "cart", "fav", "buy"))


@dataclass(frozen=True)
class SynthConfig:
    """Size and shape of a synthetic log.

    Attributes:
        n_users: users written, ids ``1..n_users``.
        n_items: catalogue size (not every item need appear).
        n_categories: number of categories; must not exceed ``n_items``.
        events_per_user: mean events per user; counts are lognormal, at least ``MIN_EVENTS``.
        interests_per_user: categories a user cares about at any time.
        drift: chance per session that one of a user's interests is replaced.
        zipf_exponent: power-law exponent of item popularity inside a category.
        new_items: share of the catalogue released during the window: each such item
            gets a release time uniform over the window's later half and no events
            before it (a category's most popular item is always there from the start).
        taste_shift: how far drifting interests move towards a reshuffled category
            popularity (0: they are drawn like the first interests; 1: wholly from the
            reshuffled one), so categories rise and fall over the window.
        start_ts: first possible timestamp (unix seconds).
        days: length of the time window; timestamps lie in ``[start_ts, start_ts + days * 86400)``.
        seed: random seed; the same config always produces the same file.
    """

    n_users: int = 2_000
    n_items: int = 20_000
    n_categories: int = 100
    events_per_user: float = 60.0
    interests_per_user: int = 3
    drift: float = 0.15
    zipf_exponent: float = 1.1
    new_items: float = 0.0
    taste_shift: float = 0.0
    start_ts: int = 1_511_539_200
    days: int = 9
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.n_users >= 1, "n_users must be at least 1"),
            (self.n_categories >= 1, "n_categories must be at least 1"),
            (self.n_items >= self.n_categories, "n_items must be at least n_categories"),
            (self.events_per_user > 0, "events_per_user must be positive"),
            (self.interests_per_user >= 1, "interests_per_user must be at least 1"),
            (0.0 <= self.drift <= 1.0, "drift must be within [0, 1]"),
            (self.zipf_exponent >= 0, "zipf_exponent must be non-negative"),
            (0.0 <= self.new_items < 1.0, "new_items must be within [0, 1)"),
            (0.0 <= self.taste_shift <= 1.0, "taste_shift must be within [0, 1]"),
            (self.days >= 1, "days must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class SynthStats:
    """What :func:`generate` wrote.

    Attributes:
        rows: lines written.
        users: distinct users.
        items_seen: distinct items that occur in the log.
        categories_seen: distinct categories that occur in the log.
        behaviours: row count per behaviour name, in :data:`events.schema.BEHAVIORS` order.
        path: the file written.
    """

    rows: int = 0
    users: int = 0
    items_seen: int = 0
    categories_seen: int = 0
    behaviours: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BEHAVIORS, 0))
    path: str = ""

    def summary(self) -> str:
        """One line: rows, users, items, categories, behaviour shares and path."""
        shares = ", ".join(f"{b} {n / max(self.rows, 1):.1%}" for b, n in self.behaviours.items())
        return (
            f"wrote {self.rows:,} rows ({self.users:,} users, {self.items_seen:,} items, "
            f"{self.categories_seen:,} categories; {shares}) to {self.path}"
        )


@dataclass
class _Catalogue:
    """Items in internal order: grouped by category, most popular first within a category.

    Attributes:
        item_ids, category_ids: external ids of internal items and categories.
        item_category: category of each internal item.
        cat_start: first internal item of each category (plus a final end).
        cat_popularity: chance of each category being picked as a new interest.
        cum_weight: running sum of item popularity weights, for sampling within a category.
        ring: internal items in neighbourhood-ring order.
        nb_start, nb_len, nb_pos: each item's neighbourhood as a slice of ``ring`` and its place in it.
    """

    item_ids: np.ndarray
    category_ids: np.ndarray
    item_category: np.ndarray
    cat_start: np.ndarray
    cat_popularity: np.ndarray
    cum_weight: np.ndarray
    ring: np.ndarray
    nb_start: np.ndarray
    nb_len: np.ndarray
    nb_pos: np.ndarray
    release: np.ndarray
    drift_popularity: np.ndarray

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def popular_items(self, rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
        """One power-law draw from each given category."""
        lo = np.where(self.cat_start[categories] > 0, self.cum_weight[self.cat_start[categories] - 1], 0.0)
        hi = self.cum_weight[self.cat_start[categories + 1] - 1]
        picked = np.searchsorted(self.cum_weight, lo + rng.random(len(categories)) * (hi - lo), side="right")
        # Float rounding can land one past either end of the category's run.
        return np.clip(picked, self.cat_start[categories], self.cat_start[categories + 1] - 1)

    def new_interests(self, rng: np.random.Generator, shape: tuple[int, ...], drifted: bool = False) -> np.ndarray:
        """Categories drawn by popularity (``drifted``: the shifted popularity of drifting interests); a user may get the same one twice, which only adds weight."""
        cum = np.cumsum(self.drift_popularity if drifted else self.cat_popularity)
        picked = np.searchsorted(cum, rng.random(shape) * cum[-1], side="right")
        return np.minimum(picked, len(self.cat_popularity) - 1)


def _catalogue(cfg: SynthConfig) -> _Catalogue:
    rng = np.random.default_rng([cfg.seed, 0])
    n, c = cfg.n_items, cfg.n_categories
    cat_weight = rng.lognormal(0.0, 1.0, c)
    sizes = 1 + rng.multinomial(n - c, cat_weight / cat_weight.sum())
    cat_start = np.zeros(c + 1, dtype=np.int64)
    np.cumsum(sizes, out=cat_start[1:])
    item_category = np.repeat(np.arange(c), sizes)
    rank = np.arange(n) - cat_start[item_category]
    ring, nb_start, nb_len, nb_pos = _neighbourhoods(rng, item_category, cat_start, sizes)
    # Its own stream, so logs without change over time keep their bytes.
    change = np.random.default_rng([cfg.seed, 2])
    span = cfg.days * 86_400
    late = (change.random(n) < cfg.new_items) & (rank > 0)
    release = np.where(late, cfg.start_ts + span * (0.5 + 0.5 * change.random(n)), 0.0)
    popularity = sizes / sizes.sum()
    shifted = (1 - cfg.taste_shift) * popularity + cfg.taste_shift * popularity[change.permutation(c)]
    return _Catalogue(
        item_ids=rng.choice(ID_SPREAD * n, n, replace=False) + 1,
        category_ids=rng.choice(ID_SPREAD * c, c, replace=False) + 1,
        item_category=item_category,
        cat_start=cat_start,
        cat_popularity=popularity,
        cum_weight=np.cumsum((rank + 1.0) ** -cfg.zipf_exponent),
        ring=ring,
        nb_start=nb_start,
        nb_len=nb_len,
        nb_pos=nb_pos,
        release=release,
        drift_popularity=shifted,
    )


def _neighbourhoods(
    rng: np.random.Generator, item_category: np.ndarray, cat_start: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut each category into rings of ``NEIGHBOURHOOD_SIZE`` items of roughly similar popularity.

    Items are ordered by popularity rank times a lognormal jitter: popular items mostly
    neighbour popular ones (as in real co-views, and keeping popularity skewed), yet
    rings still reach tail items a popularity ranking would never offer. The last ring
    of a category takes the remainder, so no ring is shorter than the size (unless its
    category is).

    Returns:
        (ring, nb_start, nb_len, nb_pos): items in ring order, and per item the start
        and length of its ring in ``ring`` and its position inside it.
    """
    rank = np.arange(len(item_category)) - cat_start[item_category]
    ring = np.lexsort(((rank + 1) * rng.lognormal(0.0, RING_POPULARITY_JITTER, len(rank)), item_category))
    slot_category = item_category[ring]
    pos_in_cat = np.arange(len(ring)) - cat_start[slot_category]
    n_rings = np.maximum(sizes // NEIGHBOURHOOD_SIZE, 1)
    ring_no = np.minimum(pos_in_cat // NEIGHBOURHOOD_SIZE, n_rings[slot_category] - 1)
    last = ring_no == n_rings[slot_category] - 1
    slot_start = cat_start[slot_category] + ring_no * NEIGHBOURHOOD_SIZE
    slot_len = np.where(last, sizes[slot_category] - ring_no * NEIGHBOURHOOD_SIZE, NEIGHBOURHOOD_SIZE)
    nb_start, nb_len, nb_pos = (np.empty_like(ring) for _ in range(3))
    nb_start[ring] = slot_start
    nb_len[ring] = slot_len
    nb_pos[ring] = np.arange(len(ring)) - slot_start
    return ring, nb_start, nb_len, nb_pos


@dataclass
class _Sessions:
    """Sessions of one chunk, grouped by user.

    Attributes:
        user: chunk-local user of each session.
        focus: category each session focuses on.
        interests: [S, interests_per_user] the user's interests during each session.
        start: start time of each session (unix seconds, float).
    """

    user: np.ndarray
    focus: np.ndarray
    interests: np.ndarray
    start: np.ndarray


def _view_counts(rng: np.random.Generator, cfg: SynthConfig, n_users: int) -> np.ndarray:
    """Views per user: lognormal, so most users are light and a few are heavy."""
    mean_views = cfg.events_per_user * PV_SHARE
    mu = np.log(mean_views) - COUNT_SIGMA**2 / 2
    return np.maximum(np.rint(rng.lognormal(mu, COUNT_SIGMA, n_users)).astype(np.int64), MIN_EVENTS)


def _sessions(
    rng: np.random.Generator, cat: _Catalogue, cfg: SynthConfig, view_user: np.ndarray, n_users: int
) -> tuple[_Sessions, np.ndarray]:
    """Split views into sessions and give each session its interests, focus and start.

    Returns:
        The sessions, and the session index of every view.
    """
    first_of_user = np.r_[True, view_user[1:] != view_user[:-1]]
    starts_session = first_of_user | (rng.random(len(view_user)) < 1.0 / SESSION_MEAN_VIEWS)
    view_session = np.cumsum(starts_session) - 1
    user = view_user[starts_session]
    first_session = np.searchsorted(user, np.arange(n_users))
    rank = np.arange(len(user)) - first_session[user]
    focus, interests = _session_interests(rng, cat, cfg, user, rank, n_users)
    # Sorting user + U(0, 1) sorts each user's draws in place, as users are contiguous.
    offset = np.sort(user + rng.random(len(user))) - user
    span = cfg.days * 86_400 - SESSION_TAIL_S
    start = cfg.start_ts + offset * span
    return _Sessions(user, focus, interests, start), view_session


def _session_interests(
    rng: np.random.Generator, cat: _Catalogue, cfg: SynthConfig, user: np.ndarray, rank: np.ndarray, n_users: int
) -> tuple[np.ndarray, np.ndarray]:
    """Walk sessions in order (k-th session of every user at once), drifting interests.

    Returns:
        (focus [S], interests [S, interests_per_user]).
    """
    k = cfg.interests_per_user
    current = cat.new_interests(rng, (n_users, k))
    cum_weight = np.cumsum(rng.dirichlet(np.ones(k), n_users), axis=1)
    order = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[order], np.arange(rank.max() + 2))
    focus = np.empty(len(user), dtype=np.int64)
    interests = np.empty((len(user), k), dtype=np.int64)
    for r in range(len(bounds) - 1):
        sessions = order[bounds[r] : bounds[r + 1]]
        users = user[sessions]
        if r > 0:
            drifts = users[rng.random(len(users)) < cfg.drift]
            current[drifts, rng.integers(0, k, len(drifts))] = cat.new_interests(rng, (len(drifts),), drifted=True)
        interests[sessions] = current[users]
        slot = (rng.random((len(users), 1)) > cum_weight[users]).sum(axis=1)
        focus[sessions] = current[users, np.minimum(slot, k - 1)]
    return focus, interests


def _views(
    rng: np.random.Generator, cat: _Catalogue, sessions: _Sessions, view_session: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Choose every viewed item without a Python loop.

    A run starts at a FRESH, OTHER or NOISE view (an anchor) and stays in the anchor's
    neighbourhood ring: NEIGHBOUR jumps to a random ring position, NEXT steps one on,
    REPEAT stays. So an item is ``ring[start + (position at last jump + NEXT steps since) % len]``.

    Returns:
        (internal item of each view, kind of each view).
    """
    n = len(view_session)
    kind = np.searchsorted(np.cumsum(KIND_PROBS), rng.random(n) * KIND_PROBS.sum(), side="right")
    kind[np.r_[True, view_session[1:] != view_session[:-1]]] = FRESH
    anchor = np.flatnonzero(kind <= NOISE)
    anchor_kind, anchor_session = kind[anchor], view_session[anchor]
    slot = rng.integers(0, sessions.interests.shape[1], len(anchor))
    category = np.where(anchor_kind == FRESH, sessions.focus[anchor_session], sessions.interests[anchor_session, slot])
    anchor_item = np.where(anchor_kind == NOISE, rng.integers(0, cat.n_items, len(anchor)), cat.popular_items(rng, category))

    idx = np.arange(n)
    item_at = np.zeros(n, dtype=np.int64)
    item_at[anchor] = anchor_item
    run_anchor = np.maximum.accumulate(np.where(kind <= NOISE, idx, 0))
    ring_start, ring_len = cat.nb_start[item_at[run_anchor]], cat.nb_len[item_at[run_anchor]]

    jump = kind == NEIGHBOUR
    # Only read at anchors and jumps: an anchor's own ring position, or a random one.
    reset_pos = np.where(jump, (rng.random(n) * ring_len).astype(np.int64), cat.nb_pos[item_at])
    last_reset = np.maximum.accumulate(np.where(jump | (kind <= NOISE), idx, 0))
    steps = np.cumsum(kind == NEXT)
    pos = (reset_pos[last_reset] + steps - steps[last_reset]) % ring_len
    return cat.ring[ring_start + pos], kind


def _funnel(rng: np.random.Generator, kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add cart, fav and buy events after views.

    Returns:
        (view index of every event, behaviour code of every event), each view followed by
        its own cart, fav and buy in that order.
    """
    n = len(kind)
    repeat_share = KIND_PROBS[REPEAT] / KIND_PROBS.sum() * (1 - 1 / SESSION_MEAN_VIEWS)
    # Scale so the repeat-view boost leaves the overall shares where they should be.
    intent = np.where(kind == REPEAT, REPEAT_INTENT, 1.0) / (1 + (REPEAT_INTENT - 1) * repeat_share)
    cart = rng.random(n) < CART_SHARE / PV_SHARE * intent
    fav = rng.random(n) < FAV_SHARE / PV_SHARE * intent
    buy = cart & (rng.random(n) < BUY_SHARE / CART_SHARE)
    views = np.arange(n)
    source = np.concatenate([views, views[cart], views[fav], views[buy]])
    code = np.concatenate([np.full(n, _PV), np.full(cart.sum(), _CART), np.full(fav.sum(), _FAV), np.full(buy.sum(), _BUY)])
    # Keys are unique (view * 4 + behaviour), so this lays out each view's events in funnel order.
    order = np.argsort(source * 4 + code)
    return source[order], code[order]


def _timestamps(
    rng: np.random.Generator, cfg: SynthConfig, sessions: _Sessions, session: np.ndarray, code: np.ndarray
) -> np.ndarray:
    """Session start plus exponential gaps (short ones before cart/fav/buy), non-decreasing per user."""
    gap = rng.exponential(1.0, len(code)) * np.where(code == _PV, VIEW_GAP_MEAN_S, ACTION_GAP_MEAN_S)
    first = np.r_[True, session[1:] != session[:-1]]
    gap[first] = 0.0
    elapsed = np.cumsum(gap)
    elapsed -= elapsed[np.flatnonzero(first)][np.cumsum(first) - 1]
    ts = np.floor(sessions.start[session] + elapsed).astype(np.int64) - cfg.start_ts
    # A long session can run past the next one's start; a running max per user keeps time
    # order, and shifting each user by a full window stops it leaking between users.
    span = cfg.days * 86_400
    user = sessions.user[session]
    ts = np.maximum.accumulate(ts + user * span) - user * span
    return cfg.start_ts + np.minimum(ts, span - 1)


def _chunk(cat: _Catalogue, cfg: SynthConfig, chunk: int, first_user: int, n_users: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Events of users ``first_user .. first_user + n_users - 1`` (0-based).

    Returns:
        (CSV-ready table, internal item of each row, behaviour code of each row).
    """
    rng = np.random.default_rng([cfg.seed, 1, chunk])
    view_user = np.repeat(np.arange(n_users), _view_counts(rng, cfg, n_users))
    sessions, view_session = _sessions(rng, cat, cfg, view_user, n_users)
    view_item, kind = _views(rng, cat, sessions, view_session)
    source, code = _funnel(rng, kind)
    session = view_session[source]
    item = view_item[source]
    ts = _timestamps(rng, cfg, sessions, session, code)
    released = ts >= cat.release[item]  # all true without new_items
    if not released.all():
        session, item, code, ts = session[released], item[released], code[released], ts[released]
    table = pa.table(
        [
            pa.array(first_user + 1 + sessions.user[session]),
            pa.array(cat.item_ids[item]),
            pa.array(cat.category_ids[cat.item_category[item]]),
            pa.DictionaryArray.from_arrays(pa.array(code), pa.array(BEHAVIORS)),
            pa.array(ts),
        ],
        names=list(TAOBAO_COLUMNS),
    )
    return table, item, code


def generate(out_path: str, config: SynthConfig = SynthConfig(), *, progress: bool = True) -> SynthStats:
    """Write a synthetic Taobao-format behaviour log.

    The file appears only when complete: it is written to ``out_path + ".tmp"`` and
    renamed over ``out_path``.

    Args:
        out_path: CSV file to write (headerless, Taobao UserBehavior columns).
        config: sizes, shape and seed; the same config always gives the same bytes.
        progress: show a progress bar over users.

    Returns:
        Counts of what was written.
    """
    cat = _catalogue(config)
    stats = SynthStats(users=config.n_users, path=out_path)
    items_seen = np.zeros(cat.n_items, dtype=bool)
    codes = np.zeros(len(BEHAVIORS), dtype=np.int64)
    tmp = out_path + ".tmp"
    options = pcsv.WriteOptions(include_header=False, quoting_style="none")
    try:
        with open(tmp, "wb") as sink, tqdm(total=config.n_users, unit="user", desc="synth", disable=not progress) as bar:
            for chunk, first in enumerate(range(0, config.n_users, USERS_PER_CHUNK)):
                n = min(USERS_PER_CHUNK, config.n_users - first)
                table, item, code = _chunk(cat, config, chunk, first, n)
                pcsv.write_csv(table, sink, options)
                stats.rows += len(code)
                items_seen[item] = True
                codes += np.bincount(code, minlength=len(BEHAVIORS))
                bar.update(n)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    stats.items_seen = int(items_seen.sum())
    stats.categories_seen = len(np.unique(cat.item_category[items_seen]))
    stats.behaviours = {b: int(n) for b, n in zip(BEHAVIORS, codes)}
    return stats


DESCRIPTION = """\
Write a synthetic behaviour log in the Taobao UserBehavior CSV format
(user_id,item_id,category_id,behavior_type,timestamp; no header), for trying the
pipeline end to end without the real data. The same arguments always give the
same file.

Planted structure, which trained models should pick up:
  - items belong to categories of uneven size; popularity inside a category is a
    power law (head and tail items); ids are random, so they reveal nothing
  - each user has a few interest categories; activity comes in sessions (minutes
    between views, hours or days between sessions), each focused on one interest;
    an interest may drift to a new category between sessions
  - inside a session the next item is often the successor of the previous one in a
    small item neighbourhood, another item of it, or the same item again, so
    co-visitation and sequence models beat popularity
  - funnel: ~89% pv, ~5.5% cart, ~3% fav, ~2% buy; cart/fav follow a view of the
    same item, buy follows a cart; repeat views convert more
  - ~2% of views go to uniformly random items (noise)
  - optional change over time, to test online learning: --new-items releases part
    of the catalogue during the later half of the window, --taste-shift moves
    drifting interests towards a reshuffled category popularity
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``funnel synth`` options to ``parser`` (and its description, if it has none).

    Args:
        parser: the subcommand's parser.
    """
    if parser.description is None:
        parser.description = DESCRIPTION
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    d = SynthConfig()
    parser.add_argument("--out", required=True, help="CSV file to write (replaced atomically when done)")
    parser.add_argument("--users", type=int, default=d.n_users, help=f"number of users (default: {d.n_users:,})")
    parser.add_argument("--items", type=int, default=d.n_items, help=f"catalogue size (default: {d.n_items:,})")
    parser.add_argument("--categories", type=int, default=d.n_categories, help=f"number of categories (default: {d.n_categories})")
    parser.add_argument(
        "--events-per-user", type=float, default=d.events_per_user,
        help=f"mean events per user; counts vary, at least {MIN_EVENTS} (default: {d.events_per_user:g})",
    )
    parser.add_argument("--interests", type=int, default=d.interests_per_user, help=f"interest categories per user (default: {d.interests_per_user})")
    parser.add_argument("--drift", type=float, default=d.drift, help=f"chance per session that an interest changes (default: {d.drift})")
    parser.add_argument(
        "--new-items", type=float, default=d.new_items, metavar="SHARE",
        help="share of the catalogue released during the later half of the window, with no events before release (default: 0)",
    )
    parser.add_argument(
        "--taste-shift", type=float, default=d.taste_shift, metavar="S",
        help="how far drifting interests move towards a reshuffled category popularity, 0 to 1 (default: 0)",
    )
    parser.add_argument("--days", type=int, default=d.days, help=f"days covered, starting 2017-11-25 UTC (default: {d.days})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``funnel synth``: generate the log and print a one-line summary.

    Args:
        args: parsed options from a parser set up by :func:`add_arguments`.

    Returns:
        0 on success, 2 when the options describe an impossible log.
    """
    try:
        config = SynthConfig(
            n_users=args.users, n_items=args.items, n_categories=args.categories, events_per_user=args.events_per_user,
            interests_per_user=args.interests, drift=args.drift, new_items=args.new_items, taste_shift=args.taste_shift,
            days=args.days, seed=args.seed,
        )
    except ValueError as err:
        print(f"funnel synth: error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    stats = generate(args.out, config, progress=not args.no_progress and sys.stderr.isatty())
    print(f"{stats.summary()} in {time.perf_counter() - started:.1f}s")
    return 0
