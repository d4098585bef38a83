"""The write-ahead journal: what makes an answer safe to send.

The receiver appends one frame per group commit and fsyncs it before the
batch's answers leave. Every few seconds it seals the segment (`N.wal` ->
`N.sealed`); the lake writer, a process of its own, decodes sealed segments
into Parquet and deletes them. So the answer path never waits on decoding,
Parquet or DuckDB (whose checkpoints stall a commit for hundreds of ms).

A frame:

    b"CSJ2" | kind (1 byte) | payload length (u32) | crc32 (u32) | first_seq (u64) | payload

kinds: `H` segment header (JSON: the codec that reads its datagrams), `D` raw
datagrams as received (ts, source, bytes each), `J` decoded reports as JSON
(replay), `T` a tick (event time moving on while no report comes). Records of
a frame have consecutive sequence numbers from first_seq.
A frame cut short by a crash was never fsync'd, so never answered: recovery
drops it and the switch's retries bring those reports again.

Under load a segment starts as a file already filled with zeros (made ahead by a
thread, `Spares`): an `fdatasync` that changes no file size or extent map needs
no filesystem journal commit, which takes a third to half off its time and most of its
outliers away. So zeros after the last frame are the clean end of a segment, and
a frame whose bytes run into them is a torn one. Sealing cuts the zeros off.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from engine.ingest import native

log = logging.getLogger(__name__)


def _compiled_durable_write() -> Callable[..., tuple[int, int]] | None:
    fastio = native.load("_fastio")
    if fastio is None:  # not built here (no C compiler, not Linux) or stale: system calls
        return None
    function: Callable[..., tuple[int, int]] = fastio.durable_write
    return function


durable_write = _compiled_durable_write()

MAGIC = b"CSJ2"
_HEADER = struct.Struct("<4scIIQ")
_DATAGRAM = struct.Struct("<dHH")
OPEN_SUFFIX = ".wal"
SEALED_SUFFIX = ".sealed"

HEADER, DATAGRAMS, JSON_RECORDS, TICK = b"H", b"D", b"J", b"T"
_TICK = struct.Struct("<d")

# A datagram as journaled: arrival time, "ip:port", the bytes.
Datagram = tuple[float, str, bytes]
# Answers to send once a frame is durable: a UDP socket's fd and (answer, raw sockaddr) pairs.
AnswersOn = tuple[int, list[tuple[bytes, bytes]]]


class JournalError(OSError):
    """The journal could not make a batch durable (disk full, read-only, I/O error)."""


@dataclass(frozen=True)
class Frame:
    kind: bytes
    first_seq: int
    payload: bytes

    def datagrams(self) -> Iterator[Datagram]:
        payload, offset, unpack = self.payload, 0, _DATAGRAM.unpack_from
        size = _DATAGRAM.size
        while offset < len(payload):
            ts, source_len, raw_len = unpack(payload, offset)
            offset += size
            source = payload[offset : offset + source_len].decode("utf-8", "replace")
            offset += source_len
            yield ts, source, payload[offset : offset + raw_len]
            offset += raw_len

    def records(self) -> list[Any]:
        records: list[Any] = orjson.loads(self.payload)
        return records


def encode_frame(kind: bytes, first_seq: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(kind + first_seq.to_bytes(8, "little")))
    return _HEADER.pack(MAGIC, kind, len(payload), crc, first_seq) + payload


def datagram_payload(datagrams: list[Datagram]) -> bytes:
    pack = _DATAGRAM.pack
    parts: list[bytes] = []
    append = parts.append
    for ts, source, raw in datagrams:
        source_bytes = source.encode("utf-8")
        append(pack(ts, len(source_bytes), len(raw)))
        append(source_bytes)
        append(raw)
    return b"".join(parts)


def tick_payload(ts: float) -> bytes:
    return _TICK.pack(ts)


def tick_of(frame: Frame) -> float:
    return float(_TICK.unpack(frame.payload)[0])


def json_payload(records: list[Any]) -> bytes:
    """Records (decoded reports, as tuples, and quarantined ones, as lists) as one JSON
    array. orjson writes what `json.dumps(..., ensure_ascii=False, separators=(",",
    ":"))` wrote (only an exponent may be spelled 1e-7 for 1e-07; the values are
    the same), faster. It takes
    a report's NamedTuple only as a plain tuple, which it asks `_as_array` for."""
    return orjson.dumps(records, default=_as_array)


def _as_array(value: object) -> tuple[Any, ...]:
    # Called by orjson for what it cannot write itself: a report (a NamedTuple) is a
    # JSON array; anything else is a bug, not something to write as best it can.
    if isinstance(value, tuple):
        return tuple(value)
    raise TypeError(f"not a journal record: {type(value).__name__}")


@dataclass(frozen=True)
class Segment:
    header: dict[str, Any]
    frames: list[Frame]
    length: int
    problem: str | None
    torn: bool


def read_segment(path: Path) -> Segment:
    """Every whole frame, the bytes they span, why reading stopped early (if it
    did), and whether that was only a torn last frame."""
    data = path.read_bytes()
    frames: list[Frame] = []
    header: dict[str, Any] = {}
    offset = 0
    problem: str | None = None
    torn = False
    while offset < len(data):
        if data[offset] == 0 and _zeros_from(data, offset):
            break  # the unused, preallocated rest of the segment
        if len(data) - offset < _HEADER.size:
            problem, torn = f"{len(data) - offset} bytes of a cut-off frame header", True
            break
        magic, kind, length, crc, first_seq = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if magic != MAGIC:
            problem = f"no frame marker at byte {offset}"
            # Only zeros after a partly written header: the last write, cut short.
            torn = _zeros_from(data, start)
            break
        if len(payload) < length:
            problem = f"frame at byte {offset} cut off ({len(payload)} of {length} bytes)"
            torn = True
            break
        if zlib.crc32(payload, zlib.crc32(kind + first_seq.to_bytes(8, "little"))) != crc:
            problem = f"frame at byte {offset} fails its checksum"
            # In a preallocated segment a cut-off last frame runs into zeros instead
            # of the end of the file; nothing written after it: torn, not corrupt.
            torn = _zeros_from(data, start + length)
            break
        if kind == HEADER:
            header = json.loads(payload)
        else:
            frames.append(Frame(kind, first_seq, payload))
        offset = start + length
    return Segment(header, frames, offset, problem, torn)


def _zeros_from(data: bytes, offset: int) -> bool:
    return data.count(0, offset) == len(data) - offset


def segment_number(path: Path) -> int | None:
    return int(path.stem) if path.stem.isdigit() else None


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sealed_path(directory: Path, segment: int) -> Path:
    return directory / f"{segment:012d}{SEALED_SUFFIX}"


def sealed_segments(directory: Path) -> list[Path]:
    found = [
        (number, path)
        for path in directory.glob(f"*{SEALED_SUFFIX}")
        if (number := segment_number(path)) is not None
    ]
    return [path for _, path in sorted(found)]


class Journal:
    """The writer's side: append frames to `N.wal`, seal it as `N.sealed`.

    Not thread-safe; the store serialises calls.
    """

    # A segment is sealed once it passes this, spare or not: the lake writer decodes
    # and detects a segment whole, so its size bounds the writer's working set under
    # a flood (about 180,000 reports; README, "Memory").
    MAX_SEGMENT_BYTES = 32 << 20

    def __init__(
        self,
        directory: Path,
        header: dict[str, Any],
        fsync: bool = True,
        *,
        preallocate: bool = False,
    ) -> None:
        self.directory = directory
        self.header = header
        self.fsync = fsync
        self.segment = 0
        self._fd: int | None = None
        self._size = 0
        self._frames = 0
        # Bytes of zeros the current segment was given (0: it grows as written).
        self._allocated = 0
        self.spares = Spares(directory) if preallocate and fsync else None
        # Told (segment, bytes, highest seq) each time the open segment's durable end
        # moves: the relay reads the open segment up to there and no further (a frame
        # written and not yet fsync'd may still be undone, `_undo_partial_write`).
        self.on_durable: Callable[[int, int, int], None] | None = None
        self.head_seq = 0

    def path(self, segment: int, suffix: str = OPEN_SUFFIX) -> Path:
        return self.directory / f"{segment:012d}{suffix}"

    def seal_leftovers(self) -> int:
        """Seal segments an earlier run left open: cut a torn tail, set a corrupt rest aside.

        Returns the highest segment number seen (sealed or open), 0 if none.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        highest = 0
        for path in sorted(self.directory.glob(f"*{OPEN_SUFFIX}")):
            number = segment_number(path)
            if number is None:
                continue
            highest = max(highest, number)
            segment = read_segment(path)
            size = path.stat().st_size
            if segment.problem is not None:
                if segment.torn:
                    log.warning(
                        "journal %s: dropped a torn tail (%s); it was never acknowledged",
                        path.name,
                        segment.problem,
                    )
                else:
                    aside = path.with_suffix(".corrupt")
                    with path.open("rb") as source:
                        source.seek(segment.length)
                        # Without the preallocated zeros after what was written.
                        aside.write_bytes(source.read().rstrip(b"\0"))
                    log.error(
                        "journal %s: %s; %d bytes after it moved to %s for inspection",
                        path.name,
                        segment.problem,
                        size - segment.length,
                        aside.name,
                    )
            if size > segment.length:
                # A torn or corrupt tail, or the unused zeros of a preallocated segment.
                with path.open("r+b") as handle:
                    handle.truncate(segment.length)
                    os.fsync(handle.fileno())
            os.replace(path, path.with_suffix(SEALED_SUFFIX))
        for path in sealed_segments(self.directory):
            highest = max(highest, segment_number(path) or 0)
        fsync_dir(self.directory)
        return highest

    def start(self, segment: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.spares is not None:
            self.spares.start()
        self.segment = segment
        self._open_current()

    def _open_current(self, take_spare: bool = False) -> None:
        path = self.path(self.segment)
        self._allocated = 0
        if take_spare and self.spares is not None:
            self._allocated = self.spares.take(path)
        flags = os.O_WRONLY | os.O_CREAT | (0 if self._allocated else os.O_TRUNC)
        self._fd = os.open(path, flags, 0o644)
        self._size = 0
        self._frames = 0
        header = encode_frame(HEADER, 0, json.dumps(self.header).encode("utf-8"))
        os.write(self._fd, header)
        self._size = len(header)
        if self.fsync:
            os.fdatasync(self._fd)
            fsync_dir(self.directory)
        self.announce()

    def announce(self) -> None:
        """Tell `on_durable` where the durable end is now."""
        if self.on_durable is not None:
            self.on_durable(self.segment, self._size, self.head_seq)

    def append(
        self,
        kind: bytes,
        first_seq: int,
        payload: bytes,
        answers: AnswersOn | None = None,
        *,
        last_seq: int = 0,
    ) -> tuple[int, int] | None:
        """Write one batch as one frame and make it durable, or raise JournalError.
        `last_seq`: the batch's highest sequence number, for `on_durable`.

        With `answers`, and the compiled helper built, they are sent the moment the
        fsync returns, without going back to Python in between; returns (sent, errno
        of the last failed send or 0). None when the caller has them to send.
        """
        frame = encode_frame(kind, first_seq, payload)
        sent: tuple[int, int] | None = None
        try:
            if self._fd is None:
                self._open_current()
            assert self._fd is not None
            if durable_write is not None:
                sock_fd, pairs = answers if answers is not None else (-1, [])
                sent = durable_write(self._fd, frame, self.fsync, sock_fd, pairs)
                if answers is None:
                    sent = None
            else:
                view = memoryview(frame)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                if self.fsync:
                    os.fdatasync(self._fd)
        except OSError as error:
            self._undo_partial_write()
            if self.spares is not None:
                self.spares.discard()  # its space may be what the next commit needs
            raise JournalError(
                error.errno, f"journal segment {self.segment}: {error.strerror}"
            ) from error
        self._size += len(frame)
        self._frames += 1
        if self.on_durable is not None:
            self.head_seq = max(self.head_seq, last_seq)
            self.on_durable(self.segment, self._size, self.head_seq)
        if self._size >= max(self._allocated, Spares.MIN_SEGMENT_BYTES) and (
            (self.spares is not None and self.spares.ready) or self._size >= self.MAX_SEGMENT_BYTES
        ):
            self._switch_to_spare()
        return sent

    def _switch_to_spare(self) -> None:
        """Load came to a segment that was given no zeros, or outgrew them, and a spare
        is ready (or it passed MAX_SEGMENT_BYTES): seal it now rather than at the next
        interval. This batch is durable already, so a failure here only leaves the
        segment open a while longer."""
        try:
            self.seal()
        except OSError as error:
            log.warning("journal segment %d not switched to a spare: %s", self.segment, error)

    def _undo_partial_write(self) -> None:
        """Leave no half frame behind, so a retried batch starts on a frame boundary."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
            # The next frame goes where this one started, not after its written part.
            os.lseek(self._fd, self._size, os.SEEK_SET)
            self._allocated = 0
        except OSError:
            # Cannot even truncate: abandon this file (sealed as it is at the next
            # start, its torn tail cut) and write the next batch to a new segment.
            os.close(self._fd)
            self._fd = None
            self.segment += 1

    def seal(self) -> int | None:
        """Seal the current segment (if it holds any batch) and start the next one.

        Returns the sealed segment's number, or None when there was nothing to seal.
        Earlier segments abandoned after a write error are sealed too.
        """
        if self._frames == 0 and self._fd is not None:
            return None
        sealed = self.segment
        sealed_bytes = self._size
        if self._fd is not None and self._allocated > self._size:
            # Not fsync'd: should a crash undo it, readers stop at the zeros anyway.
            os.ftruncate(self._fd, self._size)
        if self.spares is not None:
            self.spares.want(sealed_bytes)
        self.close()
        for path in sorted(self.directory.glob(f"*{OPEN_SUFFIX}")):
            number = segment_number(path)
            if number is not None and number <= sealed:
                os.replace(path, path.with_suffix(SEALED_SUFFIX))
        if self.fsync:
            fsync_dir(self.directory)
        self.segment = sealed + 1
        # Under load the next segment starts from the spare; a quiet one (ticks, a
        # trickle of reports) leaves it for when load comes, so idle time writes no zeros.
        self._open_current(take_spare=sealed_bytes >= Spares.MIN_SEGMENT_BYTES)
        return sealed

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard_if_empty(self) -> None:
        """At shutdown: an open segment with no batch in it is not worth keeping."""
        if self._frames == 0:
            self.close()
            self.path(self.segment).unlink(missing_ok=True)

    def stop(self) -> None:
        """At shutdown, after the last seal: no more spares, and none left on disk."""
        self.close()
        if self.spares is not None:
            self.spares.stop()


class Spares:
    """One zero-filled file kept ready for the journal's next segment, made by a
    thread of its own so the commit path never writes the zeros.

    Wanted once a segment of at least MIN_SEGMENT_BYTES is sealed (load), sized on
    it (twice its size, whole MiB, between MIN_SPARE_BYTES and MAX_SPARE_BYTES).
    Only a segment under load takes it; at a trickle of reports an fsync is quick
    anyway, and a spare for every segment sealed every couple of seconds would
    write zeros for nothing. So one spare waits on disk through quiet hours, and a
    burst switches to it as soon as its segment passes MIN_SEGMENT_BYTES. Never
    made when the disk would keep less than four times its size free.
    """

    READY = "spare.ready"
    PARTIAL = "spare.partial"
    MIN_SEGMENT_BYTES = 1 << 20
    MIN_SPARE_BYTES = 16 << 20
    MAX_SPARE_BYTES = Journal.MAX_SEGMENT_BYTES
    _CHUNK = 1 << 20
    _SYNC_EVERY = 8 << 20  # bytes of zeros between fdatasyncs, so no flush is long

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ready = directory / self.READY
        self._partial = directory / self.PARTIAL
        self._condition = threading.Condition()
        self._wanted = 0
        self._ready_bytes = 0
        self._stopping = False
        self._failing = False
        self._thread: threading.Thread | None = None
        self.made = 0
        self.used = 0

    def start(self) -> None:
        # What an earlier run left: only zeros, and of unknown size.
        self._partial.unlink(missing_ok=True)
        self._ready.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._run, name="journal-spares", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> int:
        """Bytes of the spare ready to be taken (0: none)."""
        with self._condition:
            return self._ready_bytes

    def want(self, sealed_bytes: int) -> None:
        """The segment just sealed held `sealed_bytes`: under load, size the next spare
        on it (twice that, at least MIN_SPARE_BYTES); a quiet one changes nothing."""
        if sealed_bytes < self.MIN_SEGMENT_BYTES:
            return
        wanted = max(-(-2 * sealed_bytes // self._CHUNK) * self._CHUNK, self.MIN_SPARE_BYTES)
        with self._condition:
            self._wanted = min(wanted, self.MAX_SPARE_BYTES)
            self._condition.notify()

    def take(self, path: Path) -> int:
        """Move the ready spare to `path`; returns its size, 0 when none is ready."""
        with self._condition:
            if not self._ready_bytes:
                return 0
            size, self._ready_bytes = self._ready_bytes, 0
            try:
                os.replace(self._ready, path)
            except OSError as error:
                log.warning("journal spare could not be used: %s", error)
                return 0
            self.used += 1
            self._condition.notify()
            return size

    def discard(self) -> None:
        with self._condition:
            self._ready_bytes = 0
            self._wanted = 0
            self._ready.unlink(missing_ok=True)

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._partial.unlink(missing_ok=True)
        self._ready.unlink(missing_ok=True)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and (self._ready_bytes or not self._wanted):
                    self._condition.wait()
                if self._stopping:
                    return
                size = self._wanted
            try:
                self._make(size)
            except OSError as error:
                self._partial.unlink(missing_ok=True)
                if self._stopping:
                    return
                if not self._failing:  # once until one is made again (a nearly full disk)
                    log.warning("journal spare of %d MiB not made: %s", size >> 20, error)
                self._failing = True
                with self._condition:
                    self._wanted = 0  # asked again at the next seal
                continue
            with self._condition:
                if self._stopping:
                    return
                os.replace(self._partial, self._ready)
                self._ready_bytes = size
                self.made += 1
                self._failing = False

    def _make(self, size: int) -> None:
        free = os.statvfs(self.directory)
        if free.f_bavail * free.f_frsize < 4 * size:
            raise OSError(f"less than {4 * size >> 20} MiB free")
        fd = os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            zeros = bytes(self._CHUNK)
            written = 0
            while written < size:
                if self._stopping:
                    raise OSError("stopping")
                written += os.write(fd, zeros)
                if written % self._SYNC_EVERY == 0:
                    os.fdatasync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
