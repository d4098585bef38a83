"""The receiver's side of the store: the data-dir lock, the journal, and what a restart
needs to know (the next sequence number, the keys seen within the dedup horizon).

`commit()` runs on the committer thread and returns once a batch is fsync'd;
`seal()` runs as a scheduler job. One lock orders them. The lake side lives in
`engine.lake.writer`, in a process of its own; what a restart needs from the lake
comes from the key file it keeps (`engine.ingest.keyfile`), never from the lake.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
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
    segment_number,
)
from engine.ingest.keyfile import (
    KeyFileError,
    StoredKey,
    StoredKeys,
    key_file_path,
    lake_segment_ranges,
    read_key_file,
)
from engine.ingest.records import item_of

log = logging.getLogger(__name__)

Key = tuple[str, int]


class StoreError(Exception):
    """The store cannot be opened (data dir unusable or in use); the message says why."""


@dataclass
class RecoveredKeys:
    """The keys of reports stored within the dedup horizon, in runs, oldest first: the
    key file's, read one entry at a time when asked (so recovery never holds them all
    as Python objects), then the journal's."""

    lake: StoredKeys
    since: float = float("-inf")
    journaled: list[StoredKey] = field(default_factory=list)

    def runs(self) -> Iterator[list[StoredKey]]:
        try:
            yield from self.lake.runs(self.since)
        finally:
            self.lake.close()  # read once: a second look reads the file by its name
        if self.journaled:
            yield self.journaled

    def __iter__(self) -> Iterator[StoredKey]:
        for run in self.runs():
            yield from run

    def __len__(self) -> int:
        return sum(map(len, self.runs()))


@dataclass
class Recovery:
    """What `open()` found."""

    sealed_segments: int = 0
    next_seq: int = 1
    # (call_id, serial, ts) of reports stored within the dedup horizon, oldest first.
    recent_keys: RecoveredKeys = field(default_factory=lambda: RecoveredKeys(StoredKeys()))
    # Why the key file could not be trusted as it was (then the lake writer rebuilt it).
    key_file_problem: str | None = None


class DataDirLock:
    """One engine process per data directory (serve or replay), told apart by pid."""

    def __init__(self, data_dir: Path, name: str = ".lock") -> None:
        self.path = data_dir / name
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> None:
        if self._fd is not None:
            return  # held already (a retry after a failure past the lock)
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
        self._fd = fd
        os.ftruncate(fd, 0)
        # The pid only names the holder to whoever waits (above): a full disk, which
        # has no room for it, must not keep the lock from being taken.
        with contextlib.suppress(OSError):
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

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
        self.journal = Journal(
            data_dir / "journal", codec_header(codec), fsync=fsync, preallocate=preallocate
        )
        self.dedup_horizon_s = dedup_horizon_s
        self._lock = threading.Lock()
        self._dir_lock = DataDirLock(data_dir)
        self._opened = False

    def open(self, refresh_keys: Callable[[], None] | None = None) -> Recovery:
        """Lock the data dir and recover. `refresh_keys` has the lake writer rebuild the
        key file, and returns once it has (see `_stored_keys`); without it, a key file
        that cannot be trusted is a StoreError."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._dir_lock.acquire()
        except OSError as error:
            raise StoreError(f"data dir {self.data_dir}: {error.strerror}") from None
        try:
            recovery = self._recover(refresh_keys)
        except StoreError:
            self._dir_lock.release()
            raise
        except OSError as error:
            self._dir_lock.release()
            raise StoreError(f"data dir {self.data_dir}: {error}") from None
        self._opened = True
        return recovery

    def _recover(self, refresh_keys: Callable[[], None] | None) -> Recovery:
        recovery = Recovery()
        highest_segment = self.journal.seal_leftovers()
        # Reports in sealed segments are durable but maybe not in the lake yet.
        # A lake writer left behind by a receiver that was killed may still be turning
        # sealed segments into Parquet (and deleting them) while we start: we must not
        # wait for it, the switch retries for 18 s only. So read the sealed segments
        # first and the key file after: the lake writer puts a segment's keys in the
        # key file before it deletes the segment, so one gone in between is there.
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
        numbers = {n for path in sealed if (n := segment_number(path)) is not None}
        stored, lake_ranges, recovery.key_file_problem = self._stored_keys(numbers, refresh_keys)
        latest = max([stored.max_ts] + [ts for _, _, ts in journaled])
        recovery.next_seq = max([stored.max_seq] + [seq for seq, _, _ in journaled]) + 1
        since = latest - self.dedup_horizon_s
        recovery.recent_keys = RecoveredKeys(
            stored,
            since,
            [(key[0], key[1], ts) for _, key, ts in journaled if key is not None and ts >= since],
        )
        # Never reuse a segment number: the lake names its files after them.
        in_lake = max([stored.segment] + [last for _, last in lake_ranges])
        self.journal.start(max(highest_segment, in_lake) + 1)
        return recovery

    def _stored_keys(
        self, journaled: set[int], refresh_keys: Callable[[], None] | None
    ) -> tuple[StoredKeys, list[tuple[int, int]], str | None]:
        """The key file's content, the lake's segment ranges (from file names), and what
        was wrong with the key file before the lake writer rebuilt it, if anything."""
        path = key_file_path(self.data_dir)
        lake_root = self.data_dir / "lake"
        stored = StoredKeys(horizon_s=self.dedup_horizon_s)
        try:
            # Missing: a new data dir, or a lake whose segments are all still journaled
            # (else `fresh_against` finds the lake ahead of it).
            stored = read_key_file(path, keep_open=True) or stored
            ranges = lake_segment_ranges(lake_root)
            problem = stored.fresh_against(ranges, journaled, self.dedup_horizon_s)
        except KeyFileError as error:
            problem = f"damaged ({error})"
        if problem is None:
            return stored, ranges, None
        stored.close()
        if refresh_keys is None:
            raise StoreError(
                f"key file {path}: {problem}; the lake writer rebuilds it at its start "
                "(callsentry serve and replay start one)"
            )
        log.warning("key file %s: %s; the lake writer rebuilds it from the lake", path, problem)
        refresh_keys()
        try:
            stored = read_key_file(path, keep_open=True) or StoredKeys(
                horizon_s=self.dedup_horizon_s
            )
            ranges = lake_segment_ranges(lake_root)
            still = stored.fresh_against(ranges, journaled, self.dedup_horizon_s)
        except KeyFileError as error:
            still = f"damaged ({error})"
        if still is not None:
            stored.close()
            raise StoreError(f"key file {path}: {still}, after the lake writer rebuilt it")
        return stored, ranges, problem

    def commit(
        self,
        kind: bytes,
        first_seq: int,
        payload: bytes,
        answers: AnswersOn | None = None,
        *,
        last_seq: int = 0,
    ) -> tuple[int, int] | None:
        """Make a batch durable; raises JournalError (the batch is then not stored).

        `answers` may leave straight after the fsync: see `Journal.append`.
        """
        with self._lock:
            return self.journal.append(kind, first_seq, payload, answers, last_seq=last_seq)

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
