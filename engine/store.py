"""The durable event store: journal for the acknowledgement, lake for the analysts.

`commit()` runs on the committer thread and returns once a batch is fsync'd;
`flush()` and `compact()` run as scheduler jobs. One lock orders them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.journal import Journal, JournalError, Record
from engine.lake import EVENT, REJECT, CompactionResult, Lake

log = logging.getLogger(__name__)


class StoreError(Exception):
    """The store cannot be opened (data dir unusable or in use); the message says why."""


@dataclass
class Recovery:
    """What `open()` found and repaired."""

    journal_segments: int = 0
    recovered_records: int = 0
    next_seq: int = 1
    # (call_id, serial, ts) of reports stored within the dedup horizon.
    recent_keys: list[tuple[str, int, float]] = field(default_factory=list)


class DataDirLock:
    """One engine process per data directory (serve or replay), told apart by pid."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"data dir {self.path.parent} is in use by another callsentry process "
                f"(pid {holder}); stop it or choose another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class EventStore:
    def __init__(
        self,
        data_dir: Path,
        *,
        fsync: bool = True,
        dedup_horizon_s: float = 3600.0,
        compact_target_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.data_dir = data_dir
        self.lake = Lake(data_dir)
        self.journal = Journal(data_dir / "journal", fsync=fsync)
        self.dedup_horizon_s = dedup_horizon_s
        self.compact_target_bytes = compact_target_bytes
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._dir_lock = DataDirLock(data_dir)
        # Committed records per journal segment, waiting for the next flush.
        self._buffered: dict[int, list[Record]] = {}
        self._opened = False

    def open(self) -> Recovery:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._dir_lock.acquire()
        except OSError as error:
            raise StoreError(f"data dir {self.data_dir}: {error.strerror}") from None
        try:
            return self._recover()
        except OSError as error:
            self._dir_lock.release()
            raise StoreError(f"data dir {self.data_dir}: {error}") from None

    def _recover(self) -> Recovery:
        recovery = Recovery()
        self.lake.prepare()
        leftovers = self.journal.leftover_segments()
        recovered: list[Record] = []
        for segment in leftovers:
            records = self.journal.recover(segment)
            # A crash may have left part of this segment's Parquet; write it whole again.
            self.lake.drop_segment(segment)
            self.lake.write_segment(segment, records)
            self.journal.remove(segment)
            recovered.extend(records)
        recovery.journal_segments = len(leftovers)
        recovery.recovered_records = len(recovered)
        if leftovers:
            log.info(
                "recovered %d reports from %d journal segments into the lake",
                len(recovered),
                len(leftovers),
            )
        seq_rows = self.lake.query(
            "SELECT max(seq), max(epoch_us(ts)) FROM (SELECT seq, ts FROM events "
            "UNION ALL SELECT seq, ts FROM rejects)"
        )
        max_seq, max_ts_us = seq_rows[0]
        recovery.next_seq = (max_seq or 0) + 1
        if max_ts_us is not None:
            since = max_ts_us / 1_000_000 - self.dedup_horizon_s
            recovery.recent_keys = [
                (call_id, serial, ts_us / 1_000_000)
                for call_id, serial, ts_us in self.lake.query(
                    "SELECT call_id, serial, epoch_us(ts) AS t FROM ("
                    "SELECT call_id, serial, ts FROM events WHERE ts >= to_timestamp(?) "
                    "UNION ALL SELECT call_id, serial, ts FROM rejects "
                    "WHERE ts >= to_timestamp(?) AND call_id IS NOT NULL) ORDER BY t",
                    (since, since),
                )
            ]
        # Never reuse a segment number: recovery deletes a leftover segment's Parquet by it.
        self.journal.start(max((leftovers[-1] + 1) if leftovers else 0, self._next_segment()))
        self.lake.publish_views()
        self._opened = True
        return recovery

    def _next_segment(self) -> int:
        highest = 0
        for table in ("events", "rejects"):
            for path in self.lake.files(table):
                stem = path.stem
                if stem.startswith(("seg-", "cmp-")):
                    highest = max(highest, int(stem.rsplit("-", 1)[1]))
        return highest + 1

    def commit(self, records: list[Record]) -> None:
        """Make a batch durable; raises JournalError (the batch is then not stored)."""
        with self._lock:
            self.journal.append(records)
            self._buffered.setdefault(self.journal.segment, []).extend(records)

    def flush(self) -> int:
        """Seal the journal segment and write everything sealed to the lake.

        Returns the number of records written. On a failed lake write the
        records stay buffered (and journaled) and the next flush tries again.
        """
        with self._flush_lock:
            with self._lock:
                if not self.journal.current_is_empty:
                    self.journal.rotate()
                current = self.journal.segment
                sealed = sorted(s for s in self._buffered if s < current)
            written = 0
            for segment in sealed:
                with self._lock:
                    records = self._buffered[segment]
                self.lake.write_segment(segment, records)
                with self._lock:
                    del self._buffered[segment]
                    self.journal.remove(segment)
                written += len(records)
            return written

    def compact(self) -> CompactionResult:
        with self._flush_lock:
            return self.lake.compact(self.compact_target_bytes)

    def close(self) -> None:
        if not self._opened:
            return
        try:
            for attempt in range(3):
                try:
                    self.flush()
                    break
                except OSError as error:
                    log.error("flush at shutdown failed (%s); the journal keeps the reports", error)
                    time.sleep(0.2 * (attempt + 1))
        finally:
            with self._lock:
                empty = self.journal.current_is_empty and not self._buffered
                self.journal.close()
                if empty:
                    self.journal.remove(self.journal.segment)
            self._dir_lock.release()
            self._opened = False

    def pending_records(self) -> int:
        with self._lock:
            return sum(len(records) for records in self._buffered.values())

    def iter_buffered(self) -> Iterator[Record]:
        with self._lock:
            snapshot = [list(r) for r in self._buffered.values()]
        for records in snapshot:
            yield from records


__all__ = ["EVENT", "REJECT", "EventStore", "JournalError", "Recovery", "StoreError"]
