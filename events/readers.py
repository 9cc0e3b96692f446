"""Readers for behaviour logs: Taobao UserBehavior CSV, MovieLens CSV directories and parquet.

Every reader returns an :class:`EventLog` with the same columns, so later stages never
care where the data came from. Bad rows are never dropped silently: with
``on_error="fail"`` the first bad lines are reported as ``file:line: reason``; with
``on_error="skip"`` they are counted by reason in the :class:`ReadReport`.
"""

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from tqdm import tqdm

from funnel.events.schema import BEHAVIOR_CODE, BEHAVIORS, TAOBAO_COLUMNS

OnError = Literal["fail", "skip"]
FORMATS = ("taobao", "movielens", "parquet")
MAX_REPORTED = 5
MOVIELENS_RATINGS_HEADER = "userId,movieId,rating,timestamp"

_INT = r"^-?[0-9]+$"
_UINT = r"^[0-9]+$"
_NUMBER = r"^-?[0-9]+(\.[0-9]*)?$"


class EventFormatError(ValueError):
    """A behaviour log has bad rows (or a bad header) and ``on_error`` is ``"fail"``."""


@dataclass
class ReadReport:
    """What a reader kept and skipped.

    Attributes:
        rows: rows kept.
        skipped: skipped row count per reason.
        examples: up to ``MAX_REPORTED`` ``file:line: reason`` strings for skipped rows.
    """

    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: rows kept and skipped rows by reason."""
        if not self.skipped:
            return f"read {self.rows:,} rows, none skipped"
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in self.skipped.most_common())
        return f"read {self.rows:,} rows, skipped {self.total_skipped:,} bad rows ({reasons})"


@dataclass
class EventLog:
    """A behaviour log in file order.

    Attributes:
        events: columns ``user``, ``item``, ``category`` (raw ids: strings, or int64 for
            a parquet log with integer ids, where ``7`` is the id ``"7"``), ``behavior``
            (int8 code from :data:`events.schema.BEHAVIOR_CODE`) and ``ts`` (int64 seconds).
        items: item metadata, one row per item: ``item``, ``category``, ``title`` and
            ``tags`` (``|``-separated side features such as MovieLens genres, may be empty).
        source: the path the log was read from.
        report: rows kept and skipped.
    """

    events: pd.DataFrame
    items: pd.DataFrame
    source: str
    report: ReadReport


@dataclass(frozen=True)
class _Column:
    name: str
    pattern: str | None
    reason: str


_TAOBAO_CHECKS = (
    _Column("user_id", _UINT, "non-numeric user_id"),
    _Column("item_id", _UINT, "non-numeric item_id"),
    _Column("category_id", _UINT, "non-numeric category_id"),
    _Column("behavior_type", None, "unknown behaviour"),
    _Column("timestamp", _INT, "non-numeric timestamp"),
)
_PARQUET_CHECKS = (
    # Typed columns need no digit check, and ids are opaque strings (an ingested MovieLens
    # log keeps genre names as categories); an id must only be present.
    _Column("user_id", ".", "missing user_id"),
    _Column("item_id", ".", "missing item_id"),
    _Column("category_id", ".", "missing category_id"),
    _Column("behavior_type", None, "unknown behaviour"),
    _Column("timestamp", _INT, "non-numeric timestamp"),
)
_MOVIELENS_CHECKS = (
    _Column("userId", _UINT, "non-numeric userId"),
    _Column("movieId", _UINT, "non-numeric movieId"),
    _Column("rating", _NUMBER, "non-numeric rating"),
    _Column("timestamp", _INT, "non-numeric timestamp"),
)


def release_read_memory() -> None:
    """Hand the memory pyarrow's pool freed back to the system.

    The pool keeps freed blocks for reuse; after a 100M-row read that is gigabytes the
    rest of a training run cannot otherwise use. Call it once the read log is dropped.
    """
    pa.default_memory_pool().release_unused()


def read_events(path: str, fmt: str = "taobao", *, on_error: OnError = "fail", progress: bool = False) -> EventLog:
    """Read a behaviour log.

    Args:
        path: a Taobao-format CSV, a MovieLens directory (``ratings.csv`` and optional
            ``movies.csv``) or a parquet file with the Taobao columns.
        fmt: ``"taobao"``, ``"movielens"`` or ``"parquet"``.
        on_error: ``"fail"`` raises :class:`EventFormatError` naming the first bad lines;
            ``"skip"`` drops them and counts them in ``EventLog.report``.
        progress: show a progress bar over the bytes read.

    Returns:
        The log with raw string ids, behaviour codes and integer timestamps.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if fmt == "taobao":
        return _read_taobao_csv(path, on_error, progress)
    if fmt == "movielens":
        return _read_movielens(path, on_error, progress)
    return _read_parquet(path, on_error)


def _read_taobao_csv(path: str, on_error: OnError, progress: bool) -> EventLog:
    report = ReadReport()
    parts = []
    for cols in _validated_batches(path, _TAOBAO_CHECKS, header=None, on_error=on_error, report=report, progress=progress):
        parts.append(_frame(cols["user_id"], cols["item_id"], cols["category_id"], cols["behavior_type"], cols["timestamp"]))
    events = _concat(parts)
    report.rows = len(events)
    return EventLog(events, _items_from_events(events), path, report)


def _read_movielens(path: str, on_error: OnError, progress: bool) -> EventLog:
    ratings = os.path.join(path, "ratings.csv") if os.path.isdir(path) else path
    movies = os.path.join(os.path.dirname(ratings), "movies.csv")
    report = ReadReport()
    genres = _movie_genres(movies) if os.path.exists(movies) else None
    parts = []
    for cols in _validated_batches(
        ratings, _MOVIELENS_CHECKS, header=MOVIELENS_RATINGS_HEADER, on_error=on_error, report=report, progress=progress
    ):
        n = len(cols["userId"])
        # Every rating is an interaction; ratings carry no funnel stage, so all are views.
        behaviour = pa.array(np.full(n, "pv", dtype=object), type=pa.string())
        parts.append(_frame(cols["userId"], cols["movieId"], None, behaviour, cols["timestamp"]))
    events = _concat(parts)
    report.rows = len(events)
    if genres is not None:
        events["category"] = events["item"].map(genres["category"]).fillna("unknown").astype("string[pyarrow]")
        items = _items_from_events(events)
        items["title"] = items["item"].map(genres["title"]).fillna("").astype("string[pyarrow]")
        items["tags"] = items["item"].map(genres["genres"]).fillna("").astype("string[pyarrow]")
    else:
        events["category"] = pd.array(["unknown"] * len(events), dtype="string[pyarrow]")
        items = _items_from_events(events)
    return EventLog(events, items, ratings, report)


def _movie_genres(path: str) -> pd.DataFrame:
    """``movies.csv`` → frame indexed by movie id with ``title`` and ``category`` (first genre)."""
    try:
        movies = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise EventFormatError(f"{path}: {err}") from err
    missing = {"movieId", "title", "genres"} - set(movies.columns)
    if missing:
        raise EventFormatError(f"{path}:1: header lacks {', '.join(sorted(missing))}")
    movies["genres"] = movies["genres"].replace("(no genres listed)", "")
    movies["category"] = movies["genres"].str.split("|").str[0].replace("", "unknown")
    return movies.set_index("movieId")[["title", "category", "genres"]]


def _read_parquet(path: str, on_error: OnError) -> EventLog:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise EventFormatError(f"{path}: not a readable parquet file ({err})") from err
    missing = [c for c in TAOBAO_COLUMNS if c not in schema.names]
    if missing:
        raise EventFormatError(f"{path}: missing columns {', '.join(missing)}; expected {', '.join(TAOBAO_COLUMNS)}")
    if _integer_layout(schema):
        log = _read_integer_parquet(path)
        if log is not None:
            return log
    table = pq.read_table(path, columns=list(TAOBAO_COLUMNS))
    cols = {c: pc.cast(table.column(c), pa.string()).combine_chunks() for c in TAOBAO_COLUMNS}
    report = ReadReport()
    bad = _check_columns(cols, _PARQUET_CHECKS)
    cols = _drop_bad(cols, bad, path, first_line=1, on_error=on_error, report=report, unit="row")
    events = _frame(cols["user_id"], cols["item_id"], cols["category_id"], cols["behavior_type"], cols["timestamp"])
    report.rows = len(events)
    return EventLog(events, _items_from_events(events), path, report)


def _integer_layout(schema: pa.Schema) -> bool:
    """Whether ids and time are integer columns and the behaviour a dictionary of strings (what ``funnel ingest`` writes)."""
    ints = all(pa.types.is_integer(schema.field(c).type) for c in ("user_id", "item_id", "category_id", "timestamp"))
    beh = schema.field("behavior_type").type
    return ints and pa.types.is_dictionary(beh) and pa.types.is_string(beh.value_type)


def _read_integer_parquet(path: str) -> EventLog | None:
    """Read an integer-id log column by column into integer columns, without a string per row.

    At 100M rows the string path would hold several GB of strings; here each column is
    one numeric array. Returns None when a row would be bad (a null, or a behaviour
    name not in :data:`BEHAVIORS`), so the string path finds and reports it.
    """
    file = pq.ParquetFile(path)
    columns: dict[str, np.ndarray] = {}
    for name in TAOBAO_COLUMNS:
        col = file.read(columns=[name]).column(0)
        if col.null_count:
            return None
        if name == "behavior_type":
            codes = []
            for chunk in col.chunks:
                lookup = np.array([BEHAVIOR_CODE.get(v, 0) for v in chunk.dictionary.to_pylist()], np.int8)  # dictionary value -> code
                codes.append(lookup[chunk.indices.to_numpy()] if len(lookup) else np.zeros(len(chunk), np.int8))
            columns[name] = np.concatenate(codes) if codes else np.zeros(0, np.int8)
            if (columns[name] == 0).any():
                return None
        else:
            columns[name] = col.to_numpy().astype(np.int64, copy=False)
        del col
    events = pd.DataFrame(
        {
            "user": columns["user_id"],
            "item": columns["item_id"],
            "category": columns["category_id"],
            "behavior": columns["behavior_type"],
            "ts": columns["timestamp"],
        },
        copy=False,
    )
    return EventLog(events, _items_from_events(events), path, ReadReport(rows=len(events)))


def _validated_batches(
    path: str,
    checks: tuple[_Column, ...],
    *,
    header: str | None,
    on_error: OnError,
    report: ReadReport,
    progress: bool,
    extra_checks: tuple[_Column, ...] = (),
) -> Iterator[dict[str, pa.Array]]:
    """Stream a simple (unquoted) CSV as validated string columns, batch by batch.

    Each physical line is read whole (the delimiter is a byte that never occurs) so
    that line numbers stay exact and column counts can be checked per line.
    ``extra_checks`` are further checks on named columns, after those of ``checks``.
    """
    if os.path.getsize(path) == 0:
        if header is not None:
            raise EventFormatError(f"{path}:1: expected header {header!r}, the file is empty")
        return
    _check_text(path)
    next_line = 1
    bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"reading {os.path.basename(path)}", disable=not progress)
    with bar:
        for batch in _csv_lines(path):
            lines = batch.column(0)
            bar.update((pc.sum(pc.binary_length(lines)).as_py() or 0) + len(lines))
            first_line = next_line
            next_line += len(lines)
            if header is not None and first_line == 1:
                if len(lines) == 0 or lines[0].as_py().strip() != header:
                    got = lines[0].as_py() if len(lines) else ""
                    raise EventFormatError(f"{path}:1: expected header {header!r}, found {got!r}")
                lines = lines.slice(1)
                first_line = 2
            cols, bad = _split_columns(lines, checks)
            bad.extend(_check_columns(cols, extra_checks))
            try:
                kept = _drop_bad(cols, bad, path, first_line=first_line, on_error=on_error, report=report, unit="line")
            except EventFormatError as err:
                if header is None and first_line == 1 and len(lines) and _looks_like_header(lines[0].as_py()):
                    raise EventFormatError(f"{err}\nLine 1 looks like a header, but this format has none: drop it (tail -n +2 FILE) or pass --on-error skip.") from None
                raise
            yield kept


def _check_text(path: str) -> None:
    """Refuse a file that is not UTF-8 text before parsing it, naming the file and what it looks like."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise EventFormatError(f"{path}: not a UTF-8 CSV: it is UTF-16 text; convert it first, e.g. iconv -f UTF-16 -t UTF-8 {path} > out.csv")
    if b"\x00" in head:
        raise EventFormatError(f"{path}: not a UTF-8 CSV: the first {len(head)} bytes hold NUL bytes (binary data, or UTF-16/32 without a byte-order mark)")


def _csv_lines(path: str) -> Iterator[pa.RecordBatch]:
    """The file's physical lines in batches of one string column, with pyarrow's parse errors
    (invalid UTF-8, on opening or further in) naming the file."""
    try:
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=["line"], block_size=1 << 24),
            parse_options=pcsv.ParseOptions(delimiter="\x01", quote_char=False, escape_char=False, ignore_empty_lines=False),
            convert_options=pcsv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False),
        )
        yield from reader
    except pa.ArrowInvalid as err:
        raise EventFormatError(f"{path}: not a readable UTF-8 CSV ({str(err).splitlines()[0]})") from None


def _looks_like_header(line: str) -> bool:
    """Whether a first line reads like column names (``user_id,item_id,...``): no field is a number."""
    fields = [f.strip() for f in line.split(",")]
    return len(fields) > 1 and not any(f.replace(".", "", 1).lstrip("-").isdigit() for f in fields) and any(f[:1].isalpha() for f in fields)


_Bad = tuple[np.ndarray, str, Callable[[int], str]]
"""A bad-row check result: row mask, reason key for counting, row index → message."""


def _split_columns(lines: pa.Array, checks: tuple[_Column, ...]) -> tuple[dict[str, pa.Array], list[_Bad]]:
    """Split lines on commas; return the columns and (bad-row mask, reason) pairs."""
    lines = pc.utf8_rtrim(lines, characters="\r")
    fields = pc.split_pattern(lines, ",")
    counts = pc.list_value_length(fields).to_numpy(zero_copy_only=False)
    width = len(checks)
    wrong = counts != width
    # Pad short rows so every column can be taken; those rows are already marked bad.
    padded = pc.if_else(pa.array(wrong), pa.array([[""] * width] * len(lines), type=fields.type), fields) if wrong.any() else fields
    cols = {c.name: pc.list_element(padded, i) for i, c in enumerate(checks)}
    bad: list[_Bad] = [(wrong, "wrong column count", lambda i, c=counts: f"expected {width} columns, found {c[i]}")]
    bad.extend(_check_columns(cols, checks))
    return cols, bad


def _check_columns(cols: dict[str, pa.Array], checks: tuple[_Column, ...]) -> list[_Bad]:
    bad = []
    for check in checks:
        col = cols[check.name]
        if check.pattern is None:
            ok = pc.is_in(col, value_set=pa.array(BEHAVIORS))
            describe = lambda i, col=col: f"unknown behaviour {col[i].as_py()!r} (expected one of {', '.join(BEHAVIORS)})"
        else:
            ok = pc.match_substring_regex(col, check.pattern)
            describe = lambda i, col=col, check=check: f"{check.reason} {col[i].as_py()!r}"
        mask = ~pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
        bad.append((mask, check.reason, describe))
    return bad


def _drop_bad(
    cols: dict[str, pa.Array],
    bad: list[_Bad],
    path: str,
    *,
    first_line: int,
    on_error: OnError,
    report: ReadReport,
    unit: str,
) -> dict[str, pa.Array]:
    n = len(next(iter(cols.values())))
    any_bad = np.zeros(n, dtype=bool)
    reason_of = np.full(n, -1)
    for r, (mask, _, _) in enumerate(bad):
        # The first failing check names the row's reason (a short row is not also "non-numeric").
        reason_of[mask & ~any_bad] = r
        any_bad |= mask
    if not any_bad.any():
        return cols
    rows = np.flatnonzero(any_bad)
    prefix = f"{path}:" if unit == "line" else f"{path}: row "
    messages = [f"{prefix}{first_line + i}: {bad[reason_of[i]][2](i)}" for i in rows[:MAX_REPORTED]]
    if on_error == "fail":
        raise EventFormatError(
            f"{len(rows):,} bad {unit}(s) in {path}" + (" so far" if unit == "line" else "") + ":\n"
            + "\n".join(messages)
            + "\nFix the data or pass --on-error skip to skip bad rows."
        )
    for r in reason_of[rows]:
        report.skipped[bad[r][1]] += 1
    room = MAX_REPORTED - len(report.examples)
    report.examples.extend(messages[: max(room, 0)])
    keep = pa.array(~any_bad)
    return {name: pc.filter(col, keep) for name, col in cols.items()}


def _frame(user: pa.Array, item: pa.Array, category: pa.Array | None, behavior: pa.Array, ts: pa.Array) -> pd.DataFrame:
    codes = pd.Series(behavior.to_numpy(zero_copy_only=False)).map(BEHAVIOR_CODE).to_numpy(dtype=np.int8)
    frame = pd.DataFrame(
        {
            "user": pd.array(user, dtype="string[pyarrow]"),
            "item": pd.array(item, dtype="string[pyarrow]"),
            "behavior": codes,
            "ts": pc.cast(ts, pa.int64()).to_numpy(),
        }
    )
    frame.insert(2, "category", pd.array(category, dtype="string[pyarrow]") if category is not None else "unknown")
    return frame


def _concat(parts: list[pd.DataFrame]) -> pd.DataFrame:
    if not parts:
        return _frame(pa.array([], pa.string()), pa.array([], pa.string()), pa.array([], pa.string()), pa.array([], pa.string()), pa.array([], pa.string()))
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def _items_from_events(events: pd.DataFrame) -> pd.DataFrame:
    """One row per item; an item seen under several categories keeps its most recent one."""
    last = events.drop_duplicates("item", keep="last")[["item", "category"]].reset_index(drop=True)
    last["title"] = pd.array([""] * len(last), dtype="string[pyarrow]")
    last["tags"] = pd.array([""] * len(last), dtype="string[pyarrow]")
    return last


ITEM_COLUMNS = ("item_id", "category_id")
"""Required header columns of an items file; ``title`` and ``tags`` are optional."""


def read_items(path: str) -> pd.DataFrame:
    """Read a catalogue file: CSV with a header naming ``item_id``, ``category_id`` and
    optionally ``title`` and ``tags`` (``|``-separated side features).

    Catalogue items need no interactions: they get vectors from their side features
    (cold-start items).

    Returns:
        Item metadata with columns ``item``, ``category``, ``title``, ``tags``.

    Raises:
        EventFormatError: naming the file and line of a missing id or category.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EventFormatError(f"{path}: {err}") from err
    missing = [c for c in ITEM_COLUMNS if c not in frame.columns]
    if missing:
        raise EventFormatError(f"{path}:1: header lacks {', '.join(missing)}; expected item_id,category_id[,title][,tags]")
    blank = (frame["item_id"].str.strip() == "") | (frame["category_id"].str.strip() == "")
    if blank.any():
        line = int(np.flatnonzero(blank.to_numpy())[0]) + 2
        raise EventFormatError(f"{path}:{line}: item_id and category_id must not be empty")
    string = lambda col: pd.array(frame[col] if col in frame else [""] * len(frame), dtype="string[pyarrow]")
    return pd.DataFrame({"item": string("item_id"), "category": string("category_id"), "title": string("title"), "tags": string("tags")})
