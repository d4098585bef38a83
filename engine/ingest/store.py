"""The receiver's side of the store: the data-dir lock, the journal, and what a restart
needs to know (the next sequence number, the keys seen within the dedup horizon).

`commit()` runs on the committer thread and returns once a batch is fsync'd;
`seal()` runs as a scheduler job. One lock orders them. The lake side lives in
`lakewriter.py`, in a process of its own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.ingest.codec import Codec, build_codec
from engine.ingest.journal import (
    DATAGRAMS,
    TICK,
    AnswersOn,
    Journal,
    JournalError,
    read_segment,
    sealed_segments,
)
from engine.lake.parquet import Lake, item_of

log = logging.getLogger(__name__)

Key = tuple[str, int]


class StoreError(Exception):
    """The store cannot be opened (data dir unusable or in use); the message says why."""


@dataclass
class Recovery:
    """What `open()` found."""

    sealed_segments: int = 0
    next_seq: int = 1
    # (call_id, serial, ts) of reports stored within the dedup horizon, oldest first.
    recent_keys: list[tuple[str, int, float]] = field(default_factory=list)


class DataDirLock:
    """One engine process per data directory (serve or replay), told apart by pid."""

    def __init__(self, data_dir: Path, name: str = ".lock") -> None:
        self.path = data_dir / name
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreError(
                        f"data dir {self.path.parent} is in use by another callsentry process "
                        f"(pid {holder}); stop it or choose another --data-dir"
                    ) from None
                if not warned:
                    log.warning("waiting for pid %s to release %s", holder, self.path)
                    warned = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lake_writer_lock(data_dir: Path) -> DataDirLock:
    """Held by whoever turns sealed journal segments into the lake (one at a time)."""
    return DataDirLock(data_dir, ".lake-writer.lock")


def codec_header(codec: Codec) -> dict[str, Any]:
    """What a reader needs to decode a segment's datagrams exactly as they were meant."""
    return {
        "codec": {
            "name": codec.name,
            "separator": getattr(codec, "separator", ","),
            "encodings": list(getattr(codec, "encodings", ("utf-8",))),
        }
    }


def codec_of(header: dict[str, Any]) -> Codec:
    spec = header.get("codec") or {}
    return build_codec(
        spec.get("name", "vos3000-text"),
        spec.get("separator", ","),
        spec.get("encodings", ["utf-8", "gbk"]),
    )


class EventStore:
    def __init__(
        self,
        data_dir: Path,
        codec: Codec,
        *,
        fsync: bool = True,
        dedup_horizon_s: float = 3600.0,
        preallocate: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.codec = codec
        self.lake = Lake(data_dir)
        self.journal = Journal(
            data_dir / "journal", codec_header(codec), fsync=fsync, preallocate=preallocate
        )
        self.dedup_horizon_s = dedup_horizon_s
        self._lock = threading.Lock()
        self._dir_lock = DataDirLock(data_dir)
        self._opened = False

    def open(self) -> Recovery:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._dir_lock.acquire()
        except OSError as error:
            raise StoreError(f"data dir {self.data_dir}: {error.strerror}") from None
        try:
            recovery = self._recover()
        except OSError as error:
            self._dir_lock.release()
            raise StoreError(f"data dir {self.data_dir}: {error}") from None
        self._opened = True
        return recovery

    def _recover(self) -> Recovery:
        recovery = Recovery()
        self.lake.prepare()
        highest_segment = self.journal.seal_leftovers()
        # Reports in sealed segments are durable but maybe not in the lake yet.
        # A lake writer left behind by a receiver that was killed may still be turning
        # sealed segments into Parquet (and deleting them) while we start: we must not
        # wait for it, the switch retries for 18 s only. So read the sealed segments
        # first and the lake after: a segment gone in between is in the lake by then.
        journaled: list[tuple[int, Key | None, float]] = []
        sealed = sealed_segments(self.journal.directory)
        for path in sealed:
            try:
                segment = read_segment(path)
            except FileNotFoundError:
                continue
            codec = codec_of(segment.header)
            for frame in segment.frames:
                if frame.kind == DATAGRAMS:
                    for offset, (ts, _, raw) in enumerate(frame.datagrams()):
                        read = codec.read_key(raw)
                        journaled.append((frame.first_seq + offset, read and read[0], ts))
                elif frame.kind == TICK:
                    continue  # event time moving on: no report, no key
                else:
                    for offset, record in enumerate(frame.records()):
                        item = item_of(record)
                        journaled.append((frame.first_seq + offset, item.key, item.ts))
        recovery.sealed_segments = len(sealed)
        # A new data dir (its lake holding placeholders only) asks DuckDB nothing: two
        # queries over empty files took half of opening the store.
        max_seq = max_ts_us = None
        lake_keys: list[tuple[Any, ...]] = []
        holds_reports = self.lake.holds_reports()
        if holds_reports:
            max_seq, max_ts_us = self.lake.query(
                "SELECT max(seq), max(epoch_us(ts)) FROM (SELECT seq, ts FROM events "
                "UNION ALL SELECT seq, ts FROM rejects)"
            )[0]
        latest = max([(max_ts_us or 0) / 1_000_000] + [ts for _, _, ts in journaled])
        recovery.next_seq = max([max_seq or 0] + [seq for seq, _, _ in journaled]) + 1
        since = latest - self.dedup_horizon_s
        if holds_reports:
            lake_keys = self.lake.query(
                "SELECT call_id, serial, epoch_us(ts) / 1e6 AS t FROM ("
                "SELECT call_id, serial, ts FROM events WHERE ts >= to_timestamp(?) "
                "UNION ALL SELECT call_id, serial, ts FROM rejects "
                "WHERE ts >= to_timestamp(?) AND call_id IS NOT NULL) ORDER BY t",
                (since, since),
            )
        recovery.recent_keys = [(c, s, t) for c, s, t in lake_keys] + [
            (key[0], key[1], ts) for _, key, ts in journaled if key is not None and ts >= since
        ]
        # Never reuse a segment number: the lake names its files after them.
        self.journal.start(max(highest_segment, self.lake.highest_segment()) + 1)
        self.lake.publish_views()
        return recovery

    def commit(
        self, kind: bytes, first_seq: int, payload: bytes, answers: AnswersOn | None = None
    ) -> tuple[int, int] | None:
        """Make a batch durable; raises JournalError (the batch is then not stored).

        `answers` may leave straight after the fsync: see `Journal.append`.
        """
        with self._lock:
            return self.journal.append(kind, first_seq, payload, answers)

    def seal(self) -> int | None:
        with self._lock:
            return self.journal.seal()

    def close(self) -> None:
        """Seal what was written (the lake writer takes it from there) and unlock."""
        if not self._opened:
            return
        try:
            with self._lock:
                try:
                    self.journal.seal()
                except OSError as error:
                    log.error("cannot seal the journal at shutdown (%s); next start will", error)
                self.journal.discard_if_empty()
                self.journal.stop()
        finally:
            self._dir_lock.release()
            self._opened = False


__all__ = ["EventStore", "JournalError", "Recovery", "StoreError", "codec_header", "codec_of"]
