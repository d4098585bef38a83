"""The lake: immutable Parquet segments that analysts query through `callsentry.duckdb`.

Layout under the data directory:

    lake/events/day=2026-11-28/seg-000000000042.parquet   one per journal segment and day
    lake/events/day=2026-11-28/cmp-000000000040-000000000045.parquet   after compaction
    lake/events/day=2026-11-28/grp-000000000001-000000000050.parquet   replay: many at once
    lake/rejects/...                                        the quarantine, same scheme
    lake/checks/...                                         deployment checks, same scheme
    callsentry.duckdb                                       views only, never held open

A DuckDB file is opened by one writer or many readers, never both; so the
engine never keeps `callsentry.duckdb` open. It rewrites it (views only) into a
temporary file and renames it into place (engine.lake.views), and analysts open it
read-only at any time. DuckDB is imported where it is used: a process that only
writes the lake (replay into a new data dir) never loads it.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import operator
import os
import re
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import polars as pl

from engine.core.events import CallEvent, Reject
from engine.ingest.journal import fsync_dir
from engine.ingest.keyfile import segment_range
from engine.ingest.records import Item
from engine.lake.review_status import status_sql
from engine.lake.views import sql_text, write_views_file

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)


def storage_errors() -> tuple[type[Exception], ...]:
    """What writing or reading the lake raises when the file system fails it (disk
    full, read-only, I/O error): the OS error as it is, or wrapped by polars (a
    ComputeError "... No space left on device (os error 28)") or by DuckDB (an
    IOException). The lake writer backs off and tries again on these; the journal
    keeps the reports. DuckDB's only once something has imported it: no DuckDB error
    can be raised before."""
    errors: tuple[type[Exception], ...] = (OSError, pl.exceptions.ComputeError)
    loaded = sys.modules.get("duckdb")
    return errors if loaded is None else (*errors, loaded.Error)


EVENT_SCHEMA: dict[str, Any] = {
    "seq": pl.Int64,
    "ts": pl.Datetime("us", "UTC"),
    "call_id": pl.String,
    "serial": pl.Int64,
    "state": pl.String,
    "code": pl.Int16,
    "caller": pl.String,
    "callee": pl.String,
    "forward": pl.String,
    "menu_id": pl.String,
    "menu_name": pl.String,
    "source": pl.String,
    "switch": pl.String,
}
REJECT_SCHEMA: dict[str, Any] = {
    "seq": pl.Int64,
    "ts": pl.Datetime("us", "UTC"),
    "reason": pl.String,
    "detail": pl.String,
    "call_id": pl.String,
    "serial": pl.Int64,
    "source": pl.String,
    "raw": pl.Binary,
}
CALL_SCHEMA: dict[str, Any] = {
    "call_id": pl.String,
    "caller": pl.String,
    "callee": pl.String,
    "forward": pl.String,
    "menu_id": pl.String,
    "menu_name": pl.String,
    "started_at": pl.Datetime("us", "UTC"),
    "ringing_at": pl.Datetime("us", "UTC"),
    "answered_at": pl.Datetime("us", "UTC"),
    "ended_at": pl.Datetime("us", "UTC"),
    "ring_s": pl.Float64,
    "talk_s": pl.Float64,
    "outcome": pl.String,
    "ring_code": pl.Int16,
    "reports": pl.Int32,
    "finished_at": pl.Datetime("us", "UTC"),
    "switch": pl.String,
}
ALERT_SCHEMA: dict[str, Any] = {
    "alert_id": pl.String,
    "rule_id": pl.String,
    "detector": pl.String,
    "severity": pl.String,
    "entity_type": pl.String,
    "entity": pl.String,
    "window_start": pl.Datetime("us", "UTC"),
    "window_end": pl.Datetime("us", "UTC"),
    "raised_at": pl.Datetime("us", "UTC"),
    "value": pl.Float64,
    "threshold": pl.Float64,
    "summary": pl.String,
    "evidence": pl.List(pl.String),
    "rule_version": pl.String,
    # `warning` or `critical` when raised (engine.detect.alerts); `alert_escalations`
    # and `alerts_current` say whether it escalated since.
    "level": pl.String,
}
# An alert raised at `warning` that reached `critical` later in the same incident:
# appended, never updated (at most one per alert), with the event time of the crossing
# and the value, threshold, sentence and evidence then.
ESCALATION_SCHEMA: dict[str, Any] = {
    "alert_id": pl.String,
    "rule_id": pl.String,
    "severity": pl.String,
    "entity_type": pl.String,
    "entity": pl.String,
    "level": pl.String,
    "escalated_at": pl.Datetime("us", "UTC"),
    "value": pl.Float64,
    "threshold": pl.Float64,
    "summary": pl.String,
    "evidence": pl.List(pl.String),
    "rule_version": pl.String,
}
REVIEW_SCHEMA: dict[str, Any] = {
    "review_id": pl.String,
    "alert_id": pl.String,
    "status": pl.String,
    "note": pl.String,
    "reviewer": pl.String,
    "reviewed_at": pl.Datetime("us", "UTC"),
}
# The actions' audit trail (engine.alerts.actionbook keeps it; the lake writer copies it
# here in files named after the trail's sequence numbers, act-FIRST-LAST).
ACTION_SCHEMA: dict[str, Any] = {
    "seq": pl.Int64,
    "recorded_at": pl.Datetime("us", "UTC"),
    "request_id": pl.Int64,
    "action_id": pl.String,
    "alert_id": pl.String,
    "rule_id": pl.String,
    "severity": pl.String,
    "entity_type": pl.String,
    "entity": pl.String,
    "kind": pl.String,
    "mode": pl.String,
    "dry_run": pl.Boolean,
    "step": pl.String,
    "event": pl.String,
    "reviewer": pl.String,
    "request": pl.String,
    "status": pl.String,
    "undo_at": pl.Datetime("us", "UTC"),
    "key": pl.String,
}
# Who an alert is assigned to, append-only like the reviews: the latest row counts, an
# empty assignee hands it back to the queue.
ASSIGNMENT_SCHEMA: dict[str, Any] = {
    "assignment_id": pl.String,
    "alert_id": pl.String,
    "assignee": pl.String,
    "assigned_by": pl.String,
    "assigned_at": pl.Datetime("us", "UTC"),
}
TABLES = {
    "events": EVENT_SCHEMA,
    "rejects": REJECT_SCHEMA,
    # Deployment checks (docs/protocol.md, "Check reports"): answered and kept, never
    # detected on, so never in events, calls or alerts.
    "checks": EVENT_SCHEMA,
    "calls": CALL_SCHEMA,
    "alerts": ALERT_SCHEMA,
    # Would-be alerts of rules in shadow mode: recorded, never notified.
    "shadow_alerts": ALERT_SCHEMA,
    "alert_escalations": ESCALATION_SCHEMA,
    "alert_reviews": REVIEW_SCHEMA,
    "actions": ACTION_SCHEMA,
    "alert_assignments": ASSIGNMENT_SCHEMA,
}
# The time column a table is partitioned by day on, and sorted by.
TIME_COLUMN = {
    "events": "ts",
    "rejects": "ts",
    "checks": "ts",
    "calls": "started_at",
    "alerts": "raised_at",
    "shadow_alerts": "raised_at",
    "alert_escalations": "escalated_at",
    "alert_reviews": "reviewed_at",
    "actions": "recorded_at",
    "alert_assignments": "assigned_at",
}
SORT_COLUMN = {"events": "seq", "rejects": "seq", "checks": "seq"}
# Tables whose rows are reports (each with its own seq, numbered as they were stored).
REPORT_TABLES = ("events", "rejects", "checks")
# Columns added after the first release: files written before them lack them, and the
# views (and compaction) give them this value for those rows.
ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "events": {"switch": ""},
    "checks": {"switch": ""},
    "calls": {"switch": ""},
    # Alerts from before levels were raised at their rule's one threshold: critical.
    "alerts": {"level": "critical"},
    "shadow_alerts": {"level": "critical"},
}
# Each alert with its current level (`critical` once escalated; `raised_level` is the
# level it was raised at, `escalated_at`/`escalated_value` the escalation's event time
# and value, NULL when it has none), its latest review (status 'open' until someone
# reviews it), the status read in today's vocabulary (engine.lake.review_status), and
# who it is assigned to (NULL: nobody).
ALERTS_CURRENT = f"""
SELECT a.* REPLACE (coalesce(e.level, a.level) AS level), a.level AS raised_level,
       e.escalated_at, e.value AS escalated_value,
       coalesce({status_sql("r.status")}, 'open') AS status, r.note AS review_note,
       r.reviewer, r.reviewed_at, nullif(g.assignee, '') AS assignee
FROM alerts a
LEFT JOIN (
    SELECT alert_id, level, escalated_at, value FROM alert_escalations
    QUALIFY row_number() OVER (PARTITION BY alert_id ORDER BY escalated_at, level) = 1
) e USING (alert_id)
LEFT JOIN (
    SELECT * FROM alert_reviews
    QUALIFY row_number() OVER (PARTITION BY alert_id ORDER BY reviewed_at DESC, review_id DESC) = 1
) r USING (alert_id)
LEFT JOIN (
    SELECT alert_id, assignee FROM alert_assignments
    QUALIFY row_number() OVER (
        PARTITION BY alert_id ORDER BY assigned_at DESC, assignment_id DESC) = 1
) g USING (alert_id)
"""

_TRAIL_NAME = re.compile(r"^act-(\d{12})-(\d{12})\.parquet$")
_GROUP_NAME = re.compile(r"^grp-(\d{12})-(\d{12})\.parquet$")
_PLACEHOLDER_DAY = "day=1970-01-01"
_PLACEHOLDER = "empty.parquet"


def _ts_series(values: Sequence[float]) -> pl.Series:
    micros = (pl.Series("ts", values, pl.Float64) * 1_000_000).round().cast(pl.Int64)
    return micros.cast(pl.Datetime("us", "UTC"))


_CHECK = CallEvent._fields.index("check")


def _events_frame(seqs: list[int], events: Sequence[CallEvent]) -> pl.DataFrame:
    if not events:
        return pl.DataFrame(schema=EVENT_SCHEMA)
    # The report's fields in order, but its `check` (which table it goes to).
    columns = list(zip(*events, strict=True))[:_CHECK]
    return pl.DataFrame(
        [
            pl.Series("seq", seqs, pl.Int64),
            _ts_series(columns[0]),
            *(
                pl.Series(name, column, EVENT_SCHEMA[name])
                for name, column in zip(list(EVENT_SCHEMA)[2:], columns[1:], strict=True)
            ),
        ]
    )


def _split_checks(
    seqs: list[int], events: list[CallEvent]
) -> tuple[list[int], list[CallEvent], list[int], list[CallEvent]]:
    """(seqs, events) of the reports, then of the checks among them."""
    if not any(map(operator.itemgetter(_CHECK), events)):
        return seqs, events, [], []
    kept: tuple[list[int], list[CallEvent]] = ([], [])
    checks: tuple[list[int], list[CallEvent]] = ([], [])
    for seq, event in zip(seqs, events, strict=True):
        into = checks if event.check else kept
        into[0].append(seq)
        into[1].append(event)
    return kept[0], kept[1], checks[0], checks[1]


def frames_of(batches: Iterable[tuple[int, Sequence[Item]]]) -> dict[str, pl.DataFrame]:
    """Columns of the events, rejects and checks tables from batches of (first_seq, items)."""
    event_seqs: list[int] = []
    events: list[CallEvent] = []
    reject_seqs: list[int] = []
    rejects: list[Reject] = []
    for first_seq, items in batches:
        if set(map(type, items)) == {CallEvent}:
            # The usual batch, reports only: taken whole, no Python per report.
            event_seqs.extend(range(first_seq, first_seq + len(items)))
            events.extend(cast(Sequence[CallEvent], items))
            continue
        for offset, item in enumerate(items):
            if type(item) is CallEvent:
                event_seqs.append(first_seq + offset)
                events.append(item)
            else:
                reject_seqs.append(first_seq + offset)
                rejects.append(cast(Reject, item))
    event_seqs, events, check_seqs, checks = _split_checks(event_seqs, events)
    event_frame = _events_frame(event_seqs, events)
    if rejects:
        reject_frame = pl.DataFrame(
            [
                pl.Series("seq", reject_seqs, pl.Int64),
                _ts_series([r.ts for r in rejects]),
                pl.Series("reason", [r.reason.value for r in rejects], pl.String),
                pl.Series("detail", [r.detail for r in rejects], pl.String),
                pl.Series("call_id", [r.call_id for r in rejects], pl.String),
                pl.Series("serial", [r.serial for r in rejects], pl.Int64),
                pl.Series("source", [r.source for r in rejects], pl.String),
                pl.Series("raw", [r.raw for r in rejects], pl.Binary),
            ]
        )
    else:
        reject_frame = pl.DataFrame(schema=REJECT_SCHEMA)
    return {
        "events": event_frame,
        "rejects": reject_frame,
        "checks": _events_frame(check_seqs, checks),
    }


_segment_range = segment_range

# Tables added after the first release: a lake no writer of this release has
# prepared yet reads them as empty.
ADDED_TABLES = ("checks", "actions", "alert_assignments", "alert_escalations")
_SQL_TYPES: dict[Any, str] = {
    pl.Int64: "BIGINT",
    pl.Int32: "INTEGER",
    pl.Int16: "SMALLINT",
    pl.Float64: "DOUBLE",
    pl.String: "VARCHAR",
    pl.Binary: "BLOB",
    pl.Boolean: "BOOLEAN",
    pl.Datetime("us", "UTC"): "TIMESTAMPTZ",
    pl.List(pl.String): "VARCHAR[]",
}


def _empty_select(schema: Mapping[str, Any]) -> str:
    columns = ", ".join(f"NULL::{_SQL_TYPES[dtype]} AS {name}" for name, dtype in schema.items())
    return f"SELECT {columns} LIMIT 0"


def _scan_files(paths: list[Path], table: str) -> pl.LazyFrame:
    """The rows of a table's files, in order, as one lazy frame in today's schema: a
    file written before a column was added gets that column's default (ADDED_COLUMNS)."""
    schema = TABLES[table]
    added = ADDED_COLUMNS.get(table, {})
    frames = []
    for path in paths:
        frame = pl.scan_parquet(path, hive_partitioning=False)
        names = frame.collect_schema().names()
        missing = [name for name in added if name not in names]
        if missing:
            frame = frame.with_columns(
                pl.lit(added[name], dtype=schema[name]).alias(name) for name in missing
            )
        frames.append(frame.select(list(schema)))
    return pl.concat(frames)


def _in_order(paths: list[Path], column: str) -> bool:
    """Whether the files, one after the other, hold `column` ascending with no null
    (events by seq, as their segments were numbered): read for that column alone."""
    last = None
    for path in paths:
        values = pl.read_parquet(path, columns=[column], hive_partitioning=False)[column]
        if values.null_count() or not values.is_sorted():
            return False
        if values.len():
            if last is not None and values[0] < last:
                return False
            last = values[-1]
    return True


def _days(frame: pl.DataFrame, column: str) -> list[tuple[str, pl.DataFrame]]:
    """The frame's rows by the UTC day of `column` ("YYYY-MM-DD", the folder's name).
    A frame within one day, as nearly every segment is, is taken whole: adding a day
    column and partitioning copied every row of every table of every segment."""
    first, last, nulls = frame.select(
        pl.col(column).dt.date().min().alias("first"),
        pl.col(column).dt.date().max().alias("last"),
        pl.col(column).null_count().alias("nulls"),
    ).row(0)
    if nulls == 0 and first == last:
        return [(str(first), frame)]
    days = frame.with_columns(pl.col(column).dt.date().cast(pl.String).alias("_day"))
    return [
        (str(day), part.drop("_day"))
        for (day,), part in days.partition_by("_day", as_dict=True).items()
    ]


def _sorted(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    """Sorted by `column`; as it is when it already is (events by seq, nearly always):
    sorting moves every column's values even when none changes place."""
    values = frame[column]
    if values.null_count() == 0 and values.is_sorted():
        return frame
    return frame.sort(column)


# A merge of files already in order (each sorted, each beginning where the one before
# ends: events by seq, nearly always) streams them into the merged file, in memory that
# does not grow with their rows: at most COMPACT_MAX_ROWS rows to a merged file. Files
# out of order (calls by start: a call ends in a later segment than one that started
# after it) are read whole and sorted, at most COMPACT_SORT_ROWS rows at once, so the
# lake writer's memory does not grow with a day's traffic (bench/README.md, "Memory
# under many distinct callers"). A file with half its bound or more is not merged again.
COMPACT_MAX_ROWS = 1_000_000
COMPACT_SORT_ROWS = 250_000


def _rows(path: Path) -> int:
    """A Parquet file's row count, from its footer."""
    return int(pl.scan_parquet(path, hive_partitioning=False).select(pl.len()).collect().item())


def _merges(
    small: list[tuple[tuple[int, int], Path]], max_rows: int
) -> list[list[tuple[tuple[int, int], Path]]]:
    """The small files, in segment order, as runs of two or more to merge, each of at
    most `max_rows` rows; files of half that or more are left as they are."""
    runs: list[list[tuple[tuple[int, int], Path]]] = [[]]
    rows = 0
    for entry in small:
        count = _rows(entry[1])
        if count >= max_rows // 2:
            continue
        if rows + count > max_rows:
            runs.append([])
            rows = 0
        runs[-1].append(entry)
        rows += count
    return [run for run in runs if len(run) >= 2]


def write_atomic(frame: pl.DataFrame | pl.LazyFrame, target: Path) -> None:
    """`frame` as the Parquet file `target`, whole or not at all: written beside it
    under a name no `*.parquet` pattern matches, fsync'd, then renamed over it. A lazy
    frame is streamed into it (polars' streaming engine), never held whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.{uuid.uuid4().hex}.partial"
    # zstd at level 1 (polars' default is 3): on this data no larger and faster to
    # write (bench/README.md, "Parquet compression").
    try:
        if isinstance(frame, pl.LazyFrame):
            frame.sink_parquet(
                partial,
                compression="zstd",
                compression_level=1,
                statistics=True,
                engine="streaming",
            )
        else:
            frame.write_parquet(partial, compression="zstd", compression_level=1, statistics=True)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, target)
    except BaseException:
        # A write cut short by a full disk leaves what it wrote: that space is what the
        # next try needs, and nothing ever reads a partial file.
        partial.unlink(missing_ok=True)
        raise


# Raw data that retention may remove; alerts and their reviews are the audit trail
# and are kept.
RETAINED_TABLES = ("events", "rejects", "checks", "calls")


@dataclass(frozen=True)
class CompactionResult:
    merged_files: int
    written_files: int


class Lake:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "lake"
        self.database = data_dir / "callsentry.duckdb"
        # Within `sharing()`: the in-memory DuckDB with the views that queries share,
        # made by the first of them (None until then).
        self._sharing = 0
        self._shared: duckdb.DuckDBPyConnection | None = None
        self._shared_lock = threading.Lock()

    @contextlib.contextmanager
    def sharing(self) -> Iterator[None]:
        """`query` within shares one in-memory DuckDB and its views rather than making
        its own each time (a lake writer's start asks two or three questions; what a
        DuckDB and its views cost: bench/README.md, "Process weight"). A view reads
        the files as they are when a query runs, so a shared one answers as a new one
        would."""
        with self._shared_lock:
            self._sharing += 1
        try:
            yield
        finally:
            shared = None
            with self._shared_lock:
                self._sharing -= 1
                if not self._sharing:
                    shared, self._shared = self._shared, None
            if shared is not None:
                shared.close()

    def prepare(self) -> None:
        """Create the table folders with an empty placeholder, so views work before any data."""
        for table, schema in TABLES.items():
            placeholder = self.root / table / _PLACEHOLDER_DAY / _PLACEHOLDER
            # A lake made before a column was added has a placeholder without it: made
            # again, so the table has every column even before new rows come.
            if not placeholder.exists() or pl.read_parquet_schema(placeholder) != schema:
                write_atomic(pl.DataFrame(schema=schema), placeholder)
        self._finish_interrupted_compactions()

    def prepare_table(self, table: str) -> None:
        """Give `table` its placeholder if a writer of an older release prepared this
        lake (a table's files are read only once its placeholder is there)."""
        placeholder = self.root / table / _PLACEHOLDER_DAY / _PLACEHOLDER
        if not placeholder.exists():
            write_atomic(pl.DataFrame(schema=TABLES[table]), placeholder)

    def write_segment(
        self,
        segment: int,
        batches: Iterable[tuple[int, Sequence[Item]]],
        derived: Mapping[str, pl.DataFrame] | None = None,
    ) -> int:
        """Write one journal segment's reports (and what detection derived from them:
        calls, alerts), one file per table and day, named after the segment.

        Durable (fsync'd) before it returns, so the journal segment may then go.
        Returns the number of reports (events, rejects and checks) written.
        """
        return self._write(f"seg-{segment:012d}.parquet", batches, derived)

    def write_group(
        self,
        first: int,
        last: int,
        batches: Iterable[tuple[int, Sequence[Item]]],
        derived: Mapping[str, pl.DataFrame] | None = None,
    ) -> int:
        """`write_segment` for the journal segments `first` to `last` at once, in files
        named grp-FIRST-LAST (replay: one write instead of one per segment and a
        compaction after). May be called more than once for the same group, one
        table at a time; the group is whole when every call has returned, and its
        journal segments may go only then, the last one first (see
        LakeWriter.settle, which a restart runs)."""
        return self._write(f"grp-{first:012d}-{last:012d}.parquet", batches, derived)

    def groups(self) -> list[tuple[int, int]]:
        """(first, last) of every group any table has a file of."""
        found = {
            (int(match.group(1)), int(match.group(2)))
            for table in TABLES
            for path in self.files(table)
            if (match := _GROUP_NAME.match(path.name)) is not None
        }
        return sorted(found)

    def drop_group(self, first: int, last: int) -> None:
        """Remove every file of a group (a restart found it possibly partial)."""
        name = f"grp-{first:012d}-{last:012d}.parquet"
        for table in TABLES:
            for path in (self.root / table).glob(f"day=*/{name}"):
                path.unlink()
                fsync_dir(path.parent)

    def _write(
        self,
        name: str,
        batches: Iterable[tuple[int, Sequence[Item]]],
        derived: Mapping[str, pl.DataFrame] | None,
    ) -> int:
        reports = 0
        touched: set[Path] = set()
        tables = dict(frames_of(batches))
        tables.update(derived or {})
        for table, frame in tables.items():
            if frame.is_empty():
                continue
            column = TIME_COLUMN[table]
            for day, part in _days(frame, column):
                folder = self.root / table / f"day={day}"
                ordered = _sorted(part, SORT_COLUMN.get(table, column))
                write_atomic(ordered, folder / name)
                touched.add(folder)
                if table in REPORT_TABLES:
                    reports += part.height
        for folder in touched:
            fsync_dir(folder)
        return reports

    def drop_segment(self, segment: int) -> None:
        """Remove whatever an interrupted earlier write of `segment` left."""
        name = f"seg-{segment:012d}.parquet"
        for table in TABLES:
            for path in (self.root / table).glob(f"day=*/{name}"):
                path.unlink()

    def highest_segment(self) -> int:
        """The highest journal segment number any lake file is named after (0 if none)."""
        highest = 0
        for table in TABLES:
            for path in self.files(table):
                rng = _segment_range(path.name)
                if rng is not None:
                    highest = max(highest, rng[1])
        return highest

    def holds_reports(self) -> bool:
        """Whether a table of reports has a file besides its empty placeholder."""
        return any(path.name != _PLACEHOLDER for t in REPORT_TABLES for path in self.files(t))

    def trail_end(self) -> int:
        """The highest `seq` of the actions' trail the lake holds (0: none), from the
        names of its files."""
        highest = 0
        for path in self.files("actions"):
            match = _TRAIL_NAME.match(path.name)
            if match is not None:
                highest = max(highest, int(match.group(2)))
        return highest

    def write_trail(self, frame: pl.DataFrame) -> None:
        """Append rows of the actions' trail (ACTION_SCHEMA, each `seq` after
        `trail_end()`): one file per day, named after its first and last seq, durable
        before this returns. Written again after a crash, a file replaces itself."""
        if frame.is_empty():
            return
        # Each day's part named after its own seqs, written in seq order: a crash
        # between two parts leaves the later rows for the next call.
        parts = sorted(_days(frame, "recorded_at"), key=lambda item: int(item[1]["seq"].min()))  # type: ignore[arg-type]
        for day, part in parts:
            first, last = int(part["seq"].min()), int(part["seq"].max())  # type: ignore[arg-type]
            folder = self.root / "actions" / f"day={day}"
            write_atomic(part.sort("seq"), folder / f"act-{first:012d}-{last:012d}.parquet")
            fsync_dir(folder)

    def files(self, table: str) -> list[Path]:
        return sorted((self.root / table).glob("day=*/*.parquet"))

    def report_keys(self) -> pl.LazyFrame | None:
        """`report_keys` of every report stored (events, rejects, checks)."""
        return report_keys({t: [str(p) for p in self.files(t)] for t in REPORT_TABLES})

    def glob(self, table: str) -> str:
        return str((self.root / table).resolve() / "day=*" / "*.parquet")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run SQL over the lake in a private in-memory DuckDB (never the analysts' file;
        within `sharing()`, one made for the queries there)."""
        import duckdb

        with self._shared_lock:
            if self._sharing and self._shared is None:
                shared = duckdb.connect()
                try:
                    self.create_views(shared)
                except BaseException:
                    shared.close()
                    raise
                self._shared = shared
            # A cursor is a connection of its own to the same database, for this thread.
            cursor = self._shared.cursor() if self._shared is not None else None
        if cursor is not None:
            with cursor:
                return cursor.execute(sql, list(params)).fetchall()
        with duckdb.connect() as con:
            self.create_views(con)
            return con.execute(sql, list(params)).fetchall()

    def create_views(self, con: duckdb.DuckDBPyConnection) -> None:
        for statement in self.view_statements():
            con.execute(statement)

    def view_statements(self, extra_views: Iterable[tuple[str, str]] = ()) -> list[str]:
        """The CREATE VIEW statements of the lake's tables (and `extra_views`, name and
        SQL), as the analysts' file and every query over the lake have them."""
        statements = []
        for table, schema in TABLES.items():
            placeholder = self.root / table / _PLACEHOLDER_DAY / _PLACEHOLDER
            if table in ADDED_TABLES and not placeholder.exists():
                # A lake no lake writer of this release has prepared yet: none stored.
                statements.append(f"CREATE VIEW {table} AS {_empty_select(schema)}")
                continue
            columns = self._columns(table, placeholder)
            statements.append(
                f"CREATE VIEW {table} AS SELECT {columns} FROM "
                f"read_parquet({sql_text(self.glob(table))}, "
                "hive_partitioning = true, union_by_name = true)"
            )
        statements.append(f"CREATE VIEW alerts_current AS {ALERTS_CURRENT}")
        statements.extend(f"CREATE VIEW {name} AS {sql}" for name, sql in extra_views)
        return statements

    def _columns(self, table: str, placeholder: Path) -> str:
        """What a table's view selects: every column, and those added since the first
        release as their default where a file (written before) lacks them."""
        added = ADDED_COLUMNS.get(table, {})
        if not added:
            return "*"
        try:
            present = set(pl.read_parquet_schema(placeholder)) if placeholder.exists() else set()
        except (OSError, pl.exceptions.PolarsError):
            present = set()
        if not present:
            return "*"  # not a lake callsentry prepared: DuckDB says what is wrong with it
        replaced = [
            f"coalesce({name}, {sql_text(default)}) AS {name}"
            for name, default in added.items()
            if name in present
        ]
        # Not prepared by this release yet (its placeholder is older than the column):
        # no file has the column.
        missing = [
            f"{sql_text(default)} AS {name}"
            for name, default in added.items()
            if name not in present
        ]
        return ", ".join([f"* REPLACE ({', '.join(replaced)})" if replaced else "*", *missing])

    def publish_views(self, extra_views: Iterable[tuple[str, str]] = ()) -> None:
        """Write `callsentry.duckdb` (views only) and swap it in atomically, in this
        process (engine.lake.views.ViewsFile does it in one of its own)."""
        write_views_file(self.data_dir, self.view_statements(extra_views))

    def expire(self, before: date) -> list[Path]:
        """Delete the day partitions of events, rejects and calls older than `before`.

        The newest day of each table always stays, whatever its age, and so does
        the day holding the highest report sequence number (history replayed into
        a live data directory can put it on an old day): the store recovers its
        numbering from the lake. Returns the folders removed.
        """
        removed = []
        top = self.query(
            "SELECT max(seq) FROM (SELECT seq FROM events UNION ALL SELECT seq FROM rejects "
            "UNION ALL SELECT seq FROM checks)"
        )[0][0]
        for table in RETAINED_TABLES:
            days = sorted(
                folder
                for folder in (self.root / table).glob("day=*")
                if folder.name != _PLACEHOLDER_DAY and folder.is_dir()
            )
            for folder in days[:-1]:
                try:
                    day = date.fromisoformat(folder.name.removeprefix("day="))
                except ValueError:
                    continue  # not ours: leave it
                if day >= before:
                    break
                if top is not None and table != "calls" and self._holds_seq(folder, top):
                    continue
                for path in folder.iterdir():
                    path.unlink()
                folder.rmdir()
                removed.append(folder)
            if removed:
                fsync_dir(self.root / table)
        return removed

    def _holds_seq(self, folder: Path, seq: int) -> bool:
        import duckdb

        files = str(folder.resolve() / "*.parquet")
        with duckdb.connect() as con:
            row = con.execute(
                "SELECT count(*) FROM read_parquet(?, hive_partitioning = false) WHERE seq = ?",
                [files, seq],
            ).fetchone()
        return bool(row and row[0])

    def compact(self, target_bytes: int, journaled: Iterable[int] = ()) -> CompactionResult:
        """Merge each day's small segments into one file, so file counts stay bounded.

        `journaled`: segments still in the journal. Their files are left alone: the
        journal segment goes only once the lake holds it whole, and a restart writes
        whatever it still holds again (merged, a segment's rows would be there twice).

        An intent file names the inputs before any is deleted; a crash in between
        is finished by `prepare()` on the next start (no row shown twice for long).
        An analyst query that listed the inputs just before they were deleted fails
        with a missing-file error and succeeds when run again.
        """
        pending = sorted(journaled)

        def settled(rng: tuple[int, int]) -> bool:
            at = bisect.bisect_left(pending, rng[0])
            return at == len(pending) or pending[at] > rng[1]

        merged = written = 0
        for table in TABLES:
            for folder in sorted((self.root / table).glob("day=*")):
                if folder.name == _PLACEHOLDER_DAY:
                    continue
                # In segment order, so that the events are usually in seq order already.
                small = sorted(
                    (rng, path)
                    for path in folder.glob("*.parquet")
                    if (rng := _segment_range(path.name)) is not None
                    and settled(rng)
                    and path.stat().st_size < target_bytes
                )
                if len(small) < 2:
                    continue
                column = SORT_COLUMN.get(table, TIME_COLUMN[table])
                for run in _merges(small, COMPACT_MAX_ROWS):
                    paths = [path for _, path in run]
                    if _in_order(paths, column):
                        self._merge(folder, run, _scan_files(paths, table))
                        merged += len(run)
                        written += 1
                        continue
                    for part in _merges(run, COMPACT_SORT_ROWS):
                        paths = [path for _, path in part]
                        self._merge(
                            folder, part, _sorted(_scan_files(paths, table).collect(), column)
                        )
                        merged += len(part)
                        written += 1
        return CompactionResult(merged, written)

    def _merge(
        self,
        folder: Path,
        run: list[tuple[tuple[int, int], Path]],
        frame: pl.DataFrame | pl.LazyFrame,
    ) -> None:
        """`frame`, the rows of the files of `run`, written as their merged file, which
        then replaces them."""
        first = min(rng[0] for rng, _ in run)
        last = max(rng[1] for rng, _ in run)
        inputs = [path for _, path in run]
        target = folder / f"cmp-{first:012d}-{last:012d}.parquet"
        intent = folder / "compaction.intent.json"
        try:
            plan = {"target": target.name, "inputs": [p.name for p in inputs]}
            intent.write_text(json.dumps(plan))
            write_atomic(frame, target)
        except BaseException:
            # No target, so no input was deleted: the plan is void. (Left behind, a
            # plan cut short by a full disk is unreadable at the next start.)
            intent.unlink(missing_ok=True)
            raise
        self._finish_compaction(folder, intent)

    def _finish_compaction(self, folder: Path, intent: Path) -> None:
        plan = json.loads(intent.read_text())
        if (folder / plan["target"]).exists():
            for name in plan["inputs"]:
                if name != plan["target"]:
                    (folder / name).unlink(missing_ok=True)
            fsync_dir(folder)
        intent.unlink()

    def _finish_interrupted_compactions(self) -> None:
        for intent in self.root.glob("*/day=*/compaction.intent.json"):
            log.info("finishing an interrupted compaction in %s", intent.parent)
            try:
                self._finish_compaction(intent.parent, intent)
            except (OSError, ValueError, KeyError) as error:
                log.error("cannot finish compaction %s: %s", intent, error)


def report_keys(files: Mapping[str, Sequence[str]]) -> pl.LazyFrame | None:
    """`seq`, `call_id`, `serial` and `ts_us` (microseconds since the epoch) of the
    reports in these files of the report tables (table -> paths), read by polars,
    which a process writing the lake has loaded, where DuckDB would be loaded for a
    few keys (bench/README.md, "Process weight"); None for no file. Files written
    before a column was added lack it: only these four are read."""
    scans = [
        pl.scan_parquet(
            list(paths), hive_partitioning=False, missing_columns="insert", extra_columns="ignore"
        ).select("seq", "call_id", "serial", pl.col("ts").dt.epoch("us").alias("ts_us"))
        for paths in files.values()
        if paths
    ]
    return pl.concat(scans) if scans else None


class HeldReports:
    """The keys of the reports a lake held when this was made, looked up a time span
    at a time (replay's de-duplication against what is stored): only the day
    partitions the span touches are read, and only the keys of the call ids asked
    for are kept, so a replay of a month holds a part's keys, not the month's.
    What is written to the lake after this was made is not looked at."""

    def __init__(self, lake: Lake) -> None:
        self._files: dict[str, dict[str, list[str]]] = {}
        for table in ("events", "rejects"):
            for path in lake.files(table):
                if path.name == _PLACEHOLDER or not path.parent.name.startswith("day="):
                    continue
                day = path.parent.name.removeprefix("day=")
                self._files.setdefault(day, {}).setdefault(table, []).append(str(path))

    @property
    def empty(self) -> bool:
        return not self._files

    def keys(
        self, call_ids: Iterable[str], first: float, last: float
    ) -> list[tuple[str, int, float]]:
        """(call_id, serial, time) of the reports held from `first` to `last` (epoch
        seconds, inclusive) with one of `call_ids`, oldest first."""
        days = _days_between(first, last)
        files = {
            table: [path for day in days for path in self._files.get(day, {}).get(table, [])]
            for table in ("events", "rejects")
        }
        stored = report_keys(files)
        if stored is None:
            return []
        # Times as stored, to the microsecond: a report at either end is in the span.
        span = pl.col("ts_us").is_between(round(first * 1_000_000), round(last * 1_000_000))
        held = (
            stored.filter(span, pl.col("call_id").is_in(sorted(set(call_ids))))
            .sort("ts_us")
            .select("call_id", "serial", "ts_us")
            .collect()
        )
        # Divided here: polars divides by a reciprocal, a last digit off at times.
        return [(call_id, serial, us / 1_000_000) for call_id, serial, us in held.iter_rows()]

    def close(self) -> None:
        """Nothing held open (kept for the callers' `finally`)."""


def _days_between(first: float, last: float) -> list[str]:
    """The UTC days ("YYYY-MM-DD", as the partitions are named) from `first` to `last`."""
    start = datetime.fromtimestamp(max(first, 0.0), UTC).date()
    end = datetime.fromtimestamp(max(last, first, 0.0), UTC).date()
    return [str(start + timedelta(days=n)) for n in range((end - start).days + 1)]
