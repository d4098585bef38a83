"""The write-ahead journal: what makes an answer safe to send.

One file per segment (`000000000042.wal`), appended one group-commit batch at a
time and fsync'd before the batch's answers leave. A batch is one frame:

    magic b"CSJ1" | payload length (u32) | crc32 of payload (u32) | payload

and the payload is a JSON list of records. A frame cut short by a crash was
never fsync'd, so it was never answered: recovery drops it and the switch's
retries bring those reports again.

DuckDB commits stay off this path on purpose (design.md: its checkpoints stall
a commit for hundreds of milliseconds); Parquet is fed from here asynchronously.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"CSJ1"
_HEADER = struct.Struct("<4sII")
SUFFIX = ".wal"

Record = list[Any]


class JournalError(OSError):
    """The journal could not make a batch durable (disk full, read-only, I/O error)."""


def segment_path(directory: Path, segment: int) -> Path:
    return directory / f"{segment:012d}{SUFFIX}"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_frame(records: list[Record]) -> bytes:
    payload = json.dumps(records, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_segment(path: Path) -> tuple[list[Record], int, str | None, bool]:
    """Records of every whole frame, the byte length they span, why reading stopped
    early, and whether that was only a torn (cut-off) last frame."""
    data = path.read_bytes()
    records: list[Record] = []
    offset = 0
    problem: str | None = None
    torn = False
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            problem = f"{len(data) - offset} bytes of a cut-off frame header"
            torn = True
            break
        magic, length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if magic != MAGIC:
            problem = f"no frame marker at byte {offset}"
            break
        if len(payload) < length:
            problem = f"frame at byte {offset} cut off ({len(payload)} of {length} bytes)"
            torn = True
            break
        if zlib.crc32(payload) != crc:
            problem = f"frame at byte {offset} fails its checksum"
            break
        try:
            batch = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            problem = f"frame at byte {offset} is not a JSON batch"
            break
        records.extend(batch)
        offset = start + length
    return records, offset, problem, torn


class Journal:
    """Append-only segments in one directory; not thread-safe (the store serialises calls)."""

    def __init__(self, directory: Path, fsync: bool = True) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment = 0
        self._fd: int | None = None
        self._size = 0
        self._appended = 0

    def leftover_segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit())

    def recover(self, segment: int) -> list[Record]:
        """Read a segment left by an earlier run; cut a torn tail, set a corrupt rest aside."""
        path = segment_path(self.directory, segment)
        records, good, problem, torn = read_segment(path)
        if problem is not None:
            size = path.stat().st_size
            if not torn:
                aside = path.with_suffix(".corrupt")
                with path.open("rb") as src:
                    src.seek(good)
                    aside.write_bytes(src.read())
                log.error(
                    "journal %s: %s; %d bytes after it moved to %s for inspection",
                    path.name,
                    problem,
                    size - good,
                    aside.name,
                )
            else:
                log.warning(
                    "journal %s: dropped a torn tail (%s); it was never acknowledged",
                    path.name,
                    problem,
                )
            with path.open("r+b") as handle:
                handle.truncate(good)
                os.fsync(handle.fileno())
        return records

    def start(self, segment: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment = segment
        self._open_current()

    def _open_current(self) -> None:
        path = segment_path(self.directory, self.segment)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._appended = 0
        if self.fsync:
            fsync_dir(self.directory)

    @property
    def current_is_empty(self) -> bool:
        return self._appended == 0

    def append(self, records: list[Record]) -> None:
        """Write one batch as one frame and make it durable, or raise JournalError."""
        frame = encode_frame(records)
        try:
            if self._fd is None:
                self._open_current()
            assert self._fd is not None
            view = memoryview(frame)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.fsync:
                os.fdatasync(self._fd)
        except OSError as error:
            self._undo_partial_write()
            raise JournalError(
                error.errno, f"journal segment {self.segment}: {error.strerror}"
            ) from error
        self._size += len(frame)
        self._appended += 1

    def _undo_partial_write(self) -> None:
        """Leave no half frame behind, so a retried batch starts on a frame boundary."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            # Cannot even truncate: abandon this file; recovery will cut its torn tail.
            os.close(self._fd)
            self._fd = None
            self.segment += 1

    def rotate(self) -> int:
        """Seal the current segment and start the next; returns the sealed segment number."""
        sealed = self.segment
        self.close()
        self.segment = sealed + 1
        self._open_current()
        return sealed

    def remove(self, segment: int) -> None:
        segment_path(self.directory, segment).unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def iter_all(self) -> Iterator[Record]:
        for segment in self.leftover_segments():
            yield from read_segment(segment_path(self.directory, segment))[0]
