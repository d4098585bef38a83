"""The lake: immutable Parquet segments that analysts query through `callsentry.duckdb`.

Layout under the data directory:

    lake/events/day=2026-11-28/seg-000000000042.parquet   one per journal segment and day
    lake/events/day=2026-11-28/cmp-000000000040-000000000045.parquet   after compaction
    lake/rejects/...                                        the quarantine, same scheme
    callsentry.duckdb                                       views only, never held open

A DuckDB file is opened by one writer or many readers, never both; so the
engine never keeps `callsentry.duckdb` open. It rewrites it (views only) into a
temporary file and renames it into place, and analysts open it read-only at any
time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from engine.events import CallEvent, CallState, Reject, RejectReason
from engine.journal import Record, fsync_dir

log = logging.getLogger(__name__)

EVENT, REJECT = 0, 1

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
TABLES = {"events": EVENT_SCHEMA, "rejects": REJECT_SCHEMA}

_SEGMENT_NAME = re.compile(r"^(?:seg-(\d{12})|cmp-(\d{12})-(\d{12}))\.parquet$")
_PLACEHOLDER_DAY = "day=1970-01-01"
_PLACEHOLDER = "empty.parquet"


def event_record(seq: int, event: CallEvent) -> Record:
    return [
        EVENT,
        seq,
        event.ts,
        event.call_id,
        event.serial,
        event.state.value,
        event.code,
        event.caller,
        event.callee,
        event.forward,
        event.menu_id,
        event.menu_name,
        event.source,
    ]


def reject_record(seq: int, reject: Reject) -> Record:
    # latin-1 maps every byte to one code point, so raw bytes survive JSON exactly.
    return [
        REJECT,
        seq,
        reject.ts,
        reject.reason.value,
        reject.detail,
        reject.call_id,
        reject.serial,
        reject.source,
        reject.raw.decode("latin-1"),
    ]


def item_of(record: Record) -> CallEvent | Reject:
    if record[0] == EVENT:
        return CallEvent(
            record[2],
            record[3],
            record[4],
            CallState(record[5]),
            record[6],
            *record[7:13],
        )
    return Reject(
        record[2],
        RejectReason(record[3]),
        record[4],
        record[8].encode("latin-1"),
        record[5],
        record[6],
        record[7],
    )


def _frame(rows: list[Record], schema: dict[str, Any]) -> pl.DataFrame:
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in range(len(schema) + 1)]
    data: dict[str, Any] = {}
    for name, values in zip(schema, columns[1:], strict=True):
        if name == "ts":
            data[name] = pl.Series(name, [round(v * 1_000_000) for v in values], pl.Int64).cast(
                schema[name]
            )
        elif name == "raw":
            data[name] = pl.Series(name, [v.encode("latin-1") for v in values], pl.Binary)
        else:
            data[name] = pl.Series(name, values, schema[name])
    return pl.DataFrame(data)


def frames_of(records: Sequence[Record]) -> dict[str, pl.DataFrame]:
    events = [r for r in records if r[0] == EVENT]
    rejects = [r for r in records if r[0] == REJECT]
    return {"events": _frame(events, EVENT_SCHEMA), "rejects": _frame(rejects, REJECT_SCHEMA)}


def _segment_range(name: str) -> tuple[int, int] | None:
    match = _SEGMENT_NAME.match(name)
    if match is None:
        return None
    if match.group(1) is not None:
        number = int(match.group(1))
        return number, number
    return int(match.group(2)), int(match.group(3))


def _write_atomic(frame: pl.DataFrame, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.{uuid.uuid4().hex}.partial"
    frame.write_parquet(partial, compression="zstd", statistics=True)
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, target)


@dataclass(frozen=True)
class CompactionResult:
    merged_files: int
    written_files: int


class Lake:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "lake"
        self.database = data_dir / "callsentry.duckdb"

    def prepare(self) -> None:
        """Create the table folders with an empty placeholder, so views work before any data."""
        for table, schema in TABLES.items():
            placeholder = self.root / table / _PLACEHOLDER_DAY / _PLACEHOLDER
            if not placeholder.exists():
                _write_atomic(pl.DataFrame(schema=schema), placeholder)
        self._finish_interrupted_compactions()

    def write_segment(self, segment: int, records: Sequence[Record]) -> int:
        """Write the records of one journal segment, one file per table and day.

        Durable (fsync'd) before it returns, so the journal segment may then go.
        """
        written = 0
        touched: set[Path] = set()
        for table, frame in frames_of(records).items():
            if frame.is_empty():
                continue
            days = frame.with_columns(pl.col("ts").dt.date().cast(pl.String).alias("_day"))
            for (day,), part in days.partition_by("_day", as_dict=True).items():
                folder = self.root / table / f"day={day}"
                _write_atomic(part.drop("_day").sort("seq"), folder / f"seg-{segment:012d}.parquet")
                touched.add(folder)
                written += part.height
        for folder in touched:
            fsync_dir(folder)
        return written

    def drop_segment(self, segment: int) -> None:
        """Remove whatever an interrupted earlier write of `segment` left."""
        name = f"seg-{segment:012d}.parquet"
        for table in TABLES:
            for path in (self.root / table).glob(f"day=*/{name}"):
                path.unlink()

    def files(self, table: str) -> list[Path]:
        return sorted((self.root / table).glob("day=*/*.parquet"))

    def glob(self, table: str) -> str:
        return str((self.root / table).resolve() / "day=*" / "*.parquet")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run SQL over the lake in a private in-memory DuckDB (never the analysts' file)."""
        with duckdb.connect() as con:
            for table in TABLES:
                con.execute(
                    f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{self.glob(table)}', "
                    "hive_partitioning = true, union_by_name = true)"
                )
            return con.execute(sql, list(params)).fetchall()

    def publish_views(self, extra_views: Iterable[tuple[str, str]] = ()) -> None:
        """Write `callsentry.duckdb` (views only) and swap it in atomically.

        Renaming over the file never disturbs an analyst who has the old one open
        read-only; the next connection sees the new views.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        partial = self.data_dir / f".callsentry.{uuid.uuid4().hex}.duckdb"
        try:
            with duckdb.connect(str(partial)) as con:
                for table in TABLES:
                    con.execute(
                        f"CREATE VIEW {table} AS SELECT * FROM read_parquet("
                        f"'{self.glob(table)}', hive_partitioning = true, union_by_name = true)"
                    )
                for name, sql in extra_views:
                    con.execute(f"CREATE VIEW {name} AS {sql}")
                con.execute("CHECKPOINT")
            os.replace(partial, self.database)
        finally:
            partial.unlink(missing_ok=True)
            Path(str(partial) + ".wal").unlink(missing_ok=True)

    def compact(self, target_bytes: int) -> CompactionResult:
        """Merge each day's small segments into one file, so file counts stay bounded.

        An intent file names the inputs before any is deleted; a crash in between
        is finished by `prepare()` on the next start (no row shown twice for long).
        """
        merged = written = 0
        for table in TABLES:
            for folder in sorted((self.root / table).glob("day=*")):
                if folder.name == _PLACEHOLDER_DAY:
                    continue
                small = [
                    (rng, path)
                    for path in sorted(folder.glob("*.parquet"))
                    if (rng := _segment_range(path.name)) is not None
                    and path.stat().st_size < target_bytes
                ]
                if len(small) < 2:
                    continue
                first = min(rng[0] for rng, _ in small)
                last = max(rng[1] for rng, _ in small)
                inputs = [path for _, path in small]
                target = folder / f"cmp-{first:012d}-{last:012d}.parquet"
                frame = pl.read_parquet(inputs, hive_partitioning=False).sort("seq")
                intent = folder / "compaction.intent.json"
                intent.write_text(
                    json.dumps({"target": target.name, "inputs": [p.name for p in inputs]})
                )
                _write_atomic(frame, target)
                self._finish_compaction(folder, intent)
                merged += len(inputs)
                written += 1
        return CompactionResult(merged, written)

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
