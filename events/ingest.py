"""``funnel ingest``: a behaviour log parsed and checked once, into a parquet file that ``train`` and ``evaluate`` read without re-parsing.

A Taobao CSV is streamed block by block (memory stays flat whatever its size): each
block is validated like the CSV reader does (bad rows fail with ``file:line: reason``,
or are skipped and counted), and written as one parquet row group. The ids of a Taobao
log are stored as 64-bit integers and behaviours as a dictionary-encoded string, so a
100M-row log takes a fraction of its CSV size and reads back without string parsing.
A MovieLens directory is small and read whole; its genre categories stay strings.

The file is written beside ``out`` and renamed into place when complete, so ``out`` is
never a half-written file.
"""

import os
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funnel.events.readers import _TAOBAO_CHECKS, EventLog, OnError, ReadReport, _Column, _validated_batches, read_events
from funnel.events.schema import BEHAVIORS

INGEST_FORMATS = ("taobao", "movielens")

_CANONICAL = r"^(0|[1-9][0-9]{0,17})$"
# An id stored as an integer must read back as the same string: no leading zeros ("007"
# and "7" would become one user) and at most 18 digits (every such number fits int64).
_INTEGER_ID_CHECKS = tuple(
    _Column(name, _CANONICAL, f"{name} not storable as an integer (leading zero or over 18 digits)") for name in ("user_id", "item_id", "category_id")
)

TAOBAO_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("category_id", pa.int64()),
        ("behavior_type", pa.dictionary(pa.int8(), pa.string())),
        ("timestamp", pa.int64()),
    ]
)
"""Columns of an ingested Taobao log."""


@dataclass
class IngestReport:
    """What :func:`ingest` wrote.

    Attributes:
        out: the parquet file.
        read: rows kept and skipped (by reason, with the first ``file:line: reason`` examples).
        bytes_in, bytes_out: size of the source log and of the parquet file.
        row_groups: row groups written.
        seconds: wall-clock time.
    """

    out: str
    read: ReadReport
    bytes_in: int
    bytes_out: int
    row_groups: int
    seconds: float

    def summary(self) -> str:
        """One line for the terminal."""
        ratio = self.bytes_out / max(self.bytes_in, 1)
        return (
            f"{self.out}: {self.read.summary()}; {self.bytes_out / 2**20:,.1f} MiB in {self.row_groups} row groups "
            f"({ratio:.0%} of the log's {self.bytes_in / 2**20:,.1f} MiB) in {self.seconds:.1f} s"
        )


def ingest(*, events: str, out: str, fmt: str = "taobao", on_error: OnError = "fail", progress: bool = False) -> IngestReport:
    """Parse and check a behaviour log once and write it as parquet.

    Args:
        events: a Taobao-format CSV, or a MovieLens directory (``ratings.csv``, optional ``movies.csv``).
        out: the parquet file to write (replaced atomically if it exists).
        fmt: ``"taobao"`` or ``"movielens"``.
        on_error: ``"fail"`` stops at the first block with bad rows, naming them
            (``file:line: reason``); ``"skip"`` drops bad rows and counts them.
        progress: show a progress bar (bytes read, rate and time left).

    Returns:
        The report.

    Raises:
        EventFormatError: bad rows with ``on_error="fail"`` (``out`` is left untouched).
        FileNotFoundError: ``events`` does not exist.
    """
    if fmt not in INGEST_FORMATS:
        raise ValueError(f"ingest reads {' or '.join(INGEST_FORMATS)} logs, not {fmt!r}")
    if not os.path.exists(events):
        raise FileNotFoundError(f"{events}: no such file or directory")
    started = time.perf_counter()
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    # A unique name beside ``out`` (same file system, so the rename is atomic), created
    # by the writer with the usual permissions.
    tmp = os.path.join(directory, f".{os.path.basename(out)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if fmt == "taobao":
            report, groups = _ingest_taobao(events, tmp, on_error, progress)
        else:
            report, groups = _ingest_log(read_events(events, fmt, on_error=on_error, progress=progress), tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    size_in = os.path.getsize(events) if os.path.isfile(events) else sum(e.stat().st_size for e in os.scandir(events) if e.is_file())
    return IngestReport(out, report, size_in, os.path.getsize(out), groups, time.perf_counter() - started)


def _ingest_taobao(path: str, tmp: str, on_error: OnError, progress: bool) -> tuple[ReadReport, int]:
    report = ReadReport()
    behaviours = pa.array(BEHAVIORS)
    groups = 0
    with pq.ParquetWriter(tmp, TAOBAO_SCHEMA, compression="zstd") as writer:
        batches = _validated_batches(
            path, _TAOBAO_CHECKS, header=None, on_error=on_error, report=report, progress=progress, extra_checks=_INTEGER_ID_CHECKS
        )
        for cols in batches:
            n = len(cols["user_id"])
            if not n:
                continue
            arrays = [pc.cast(cols[name], pa.int64()) for name in ("user_id", "item_id", "category_id")]
            codes = pc.index_in(cols["behavior_type"], value_set=behaviours).cast(pa.int8())  # validated: never null
            arrays.append(pa.DictionaryArray.from_arrays(codes, behaviours))
            arrays.append(pc.cast(cols["timestamp"], pa.int64()))
            writer.write_table(pa.Table.from_arrays(arrays, schema=TAOBAO_SCHEMA))
            report.rows += n
            groups += 1
    return report, groups


def _ingest_log(log: EventLog, tmp: str) -> tuple[ReadReport, int]:
    e = log.events
    table = pa.table(
        {
            "user_id": pa.array(e["user"], pa.string()),
            "item_id": pa.array(e["item"], pa.string()),
            "category_id": pa.array(e["category"], pa.string()),
            "behavior_type": pa.DictionaryArray.from_arrays(pa.array(e["behavior"].to_numpy() - 1, pa.int8()), pa.array(BEHAVIORS)),
            "timestamp": pa.array(e["ts"], pa.int64()),
        }
    )
    pq.write_table(table, tmp, compression="zstd")
    return log.report, pq.ParquetFile(tmp).num_row_groups
