"""Stored reports read back from the journal, in the order they were stored.

The receiver journals each group commit and answers it after the fsync
(engine.ingest.journal). The relay reads the same segments afterwards, in its own
process, so it never sits on the answer path:

- the open segment only up to its durable end, which the journal publishes after
  each fsync (`DurableMark`): a frame written but not yet durable may still be
  undone, and the relay sends only stored reports;
- sealed segments whole. Once the lake writer has put a sealed segment in the lake
  it hands it to `HeldSegments` (DATA_DIR/relay/held/) instead of deleting it; the
  relay deletes it once every target's cursor is past it, or, for a target down
  longer than the horizon (or past the byte bound), gives up what that target
  still lacked in it, counted.

A position is (segment number, byte offset of a frame); a segment keeps its
number from `N.wal` to `N.sealed` to `held/N.sealed`, and a reader keeps its file
open across those renames.

Only live reports are relayed: datagram frames (`D`) whose datagram decodes to a
report, and that `relayable` accepts (check traffic is not). JSON frames are
replay's, ticks carry no report, a quarantined datagram is no report.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from engine.core.events import CallEvent
from engine.ingest.codec import Codec
from engine.ingest.journal import (
    DATAGRAMS,
    HEADER,
    MAGIC,
    OPEN_SUFFIX,
    SEALED_SUFFIX,
    Frame,
    segment_number,
)
from engine.ingest.store import codec_of

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<4scIIQ")

# Relayed unless the predicate says no (check traffic: see engine/apps/relay.py).
Relayable = Callable[[CallEvent], bool]


def relay_all(event: CallEvent) -> bool:
    return True


class Position(NamedTuple):
    segment: int
    offset: int


class RelayItem(NamedTuple):
    """A stored report: its sequence number, the frame it was read from, the datagram
    as the switch sent it, and what it says."""

    seq: int
    at: Position
    raw: bytes
    event: CallEvent


class Durable(NamedTuple):
    segment: int
    offset: int
    # The highest sequence number stored (reports and quarantined datagrams alike).
    head: int


class DurableMark:
    """The open journal segment, how many of its bytes are durable, and the highest
    sequence number stored, shared between the receiver's process (which sets them
    after each fsync) and the relay's.

    The receiver must never wait for the relay (which runs at idle priority and may
    be preempted at any instant), so there is no lock: a sequence count around each
    write (odd while writing), and a reader that retries when the count moved or was
    odd. One writer only (the store serialises commits). Each slot is an aligned
    8-byte integer, written and read whole, and the stores of one process are seen
    by another in the order made (x86-64's ordering; the machines callsentry runs on).
    """

    def __init__(self, array: Any) -> None:
        self.array = array
        self._count = int(array[0]) & ~1

    @classmethod
    def create(cls, context: Any) -> DurableMark:
        return cls(context.RawArray("q", 4))

    def set(self, segment: int, size: int, head: int) -> None:
        array = self.array
        self._count += 1
        array[0] = self._count
        array[1] = segment
        array[2] = size
        array[3] = head
        self._count += 1
        array[0] = self._count

    def get(self) -> Durable:
        array = self.array
        while True:
            count = array[0]
            if count & 1:
                continue
            value = Durable(int(array[1]), int(array[2]), int(array[3]))
            if array[0] == count:
                return value


def held_dir(data_dir: Path) -> Path:
    return data_dir / "relay" / "held"


def segment_paths(data_dir: Path, number: int) -> list[Path]:
    """Where segment `number` may be, in the order it moves through them."""
    name = f"{number:012d}"
    journal = data_dir / "journal"
    return [
        journal / f"{name}{OPEN_SUFFIX}",
        journal / f"{name}{SEALED_SUFFIX}",
        held_dir(data_dir) / f"{name}{SEALED_SUFFIX}",
    ]


def segment_numbers(data_dir: Path) -> list[int]:
    """Every journal segment on disk (open, sealed, held), in order."""
    found: set[int] = set()
    for folder, suffixes in (
        (data_dir / "journal", (OPEN_SUFFIX, SEALED_SUFFIX)),
        (held_dir(data_dir), (SEALED_SUFFIX,)),
    ):
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            path = Path(name)
            if path.suffix in suffixes and (number := segment_number(path)) is not None:
                found.add(number)
    return sorted(found)


class FrameCache:
    """The relayable reports of recently read frames, so targets reading the same
    frames decode them once: (segment, offset) -> (next offset, last seq, items);
    and the codec each segment's header names."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._frames: dict[Position, tuple[int, int, list[RelayItem]]] = {}
        self.codecs: dict[int, Codec] = {}

    def get(self, at: Position) -> tuple[int, int, list[RelayItem]] | None:
        return self._frames.get(at)

    def put(self, at: Position, value: tuple[int, int, list[RelayItem]]) -> None:
        if len(self._frames) >= self.capacity:
            del self._frames[next(iter(self._frames))]
        self._frames[at] = value


class JournalReader:
    """Reads relayable reports from `position` on, skipping those at or below
    `after_seq`. `through` is the highest sequence number read so far (relayable or
    not): everything up to it has been seen."""

    def __init__(
        self,
        data_dir: Path,
        mark: DurableMark,
        position: Position,
        after_seq: int,
        *,
        relayable: Relayable = relay_all,
        cache: FrameCache | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.mark = mark
        self.position = position
        self.through = after_seq
        self.relayable = relayable
        self.cache = cache if cache is not None else FrameCache()
        self._fd: int | None = None
        # Segments found missing, said once each.
        self.missing: list[int] = []

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, limit: int) -> list[RelayItem]:
        """At least one frame's worth of reports past `through`, up to about `limit`
        (whole frames); [] when nothing more is durable yet."""
        items: list[RelayItem] = []
        while len(items) < limit:
            frame = self._next_frame()
            if frame is None:
                break
            self._take(frame, items)
        return items

    def skip_segment(self) -> list[RelayItem]:
        """Read the rest of the current segment and move past it: the relayable reports
        it still held for this reader (for counting what is given up)."""
        segment = self.position.segment
        skipped: list[RelayItem] = []
        while self.position.segment == segment:
            frame = self._next_frame(stop_at_end=True)
            if frame is None:
                break
            self._take(frame, skipped)
        if self.position.segment == segment:
            self._move_past(segment)
        return skipped

    def _take(self, frame: tuple[list[RelayItem], int], into: list[RelayItem]) -> None:
        items, last_seq = frame
        through = self.through
        into.extend(item for item in items if item.seq > through)
        self.through = max(through, last_seq)

    def _open(self) -> bool:
        number = self.position.segment
        for path in segment_paths(self.data_dir, number):
            try:
                self._fd = os.open(path, os.O_RDONLY)
                return True
            except FileNotFoundError:
                continue
        return False

    def _move_past(self, segment: int) -> None:
        self.close()
        later = [n for n in segment_numbers(self.data_dir) if n > segment]
        following = later[0] if later else max(segment + 1, self.mark.get().segment)
        self.position = Position(following, 0)

    def _next_frame(self, stop_at_end: bool = False) -> tuple[list[RelayItem], int] | None:
        """The relayable items of the next frame (header frames give []) and its last
        sequence number (-1: none), or None when nothing more can be read now."""
        while True:
            mark = self.mark.get()
            at = self.position
            cached = self.cache.get(at)
            if cached is not None:
                next_offset, cached_last, cached_items = cached
                self.position = Position(at.segment, next_offset)
                return cached_items, cached_last
            if self._fd is None and not self._open():
                if at.segment < mark.segment:
                    # Gone: a segment released while relaying was off, or given up.
                    if at.segment not in self.missing:
                        self.missing.append(at.segment)
                        log.warning(
                            "journal segment %d is gone; reports in it are not relayed",
                            at.segment,
                        )
                    self._move_past(at.segment)
                    continue
                return None
            assert self._fd is not None
            sealed = at.segment < mark.segment
            end = os.fstat(self._fd).st_size if sealed else min(mark.offset, self._size())
            if at.offset + _HEADER.size > end:
                if sealed and not stop_at_end:
                    self._move_past(at.segment)
                    continue
                return None
            header = os.pread(self._fd, _HEADER.size, at.offset)
            magic, kind, length, crc, first_seq = _HEADER.unpack(header)
            start = at.offset + _HEADER.size
            payload = os.pread(self._fd, length, start) if magic == MAGIC else b""
            whole = (
                magic == MAGIC
                and len(payload) == length
                and start + length <= end
                and zlib.crc32(payload, zlib.crc32(kind + first_seq.to_bytes(8, "little"))) == crc
            )
            if not whole:
                if sealed:
                    if header != bytes(len(header)):
                        log.error(
                            "journal segment %d: no whole frame at byte %d; the rest of it "
                            "is not relayed",
                            at.segment,
                            at.offset,
                        )
                    if stop_at_end:
                        return None
                    self._move_past(at.segment)
                    continue
                return None
            next_offset = start + length
            items: list[RelayItem] = []
            last_seq = -1  # no report in it (a header, a tick; a replay frame is no concern)
            if kind == HEADER:
                codecs = self.cache.codecs
                if len(codecs) >= self.cache.capacity:
                    del codecs[min(codecs)]
                codecs[at.segment] = codec_of(json.loads(payload))
            elif kind == DATAGRAMS:
                items, last_seq = self._decode(Frame(kind, first_seq, payload), at)
            self.cache.put(at, (next_offset, last_seq, items))
            self.position = Position(at.segment, next_offset)
            return items, last_seq

    def _size(self) -> int:
        assert self._fd is not None
        return os.fstat(self._fd).st_size

    def _segment_codec(self, segment: int) -> Codec:
        codec = self.cache.codecs.get(segment)
        if codec is None:
            # Read past its header frame in the cache: the header is the first frame.
            assert self._fd is not None
            magic, kind, length, _, _ = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))
            header: dict[str, Any] = {}
            if magic == MAGIC and kind == HEADER:
                try:
                    header = json.loads(os.pread(self._fd, length, _HEADER.size))
                except ValueError:
                    header = {}
            codec = self.cache.codecs[segment] = codec_of(header)
        return codec

    def _decode(self, frame: Frame, at: Position) -> tuple[list[RelayItem], int]:
        codec = self._segment_codec(at.segment)
        relayable = self.relayable
        items: list[RelayItem] = []
        seq = frame.first_seq - 1
        for seq, (ts, source, raw) in enumerate(frame.datagrams(), frame.first_seq):
            event = codec.decode(raw, ts, source).item
            if type(event) is CallEvent and relayable(event):
                items.append(RelayItem(seq, at, raw, event))
        return items, seq


class HeldSegments:
    """Journal segments the lake writer is done with and a relay target may still need.

    The lake writer's process calls `take` (a rename into DATA_DIR/relay/held/); the
    relay's process calls `release_before` once every target is past a segment, and
    `over_bounds` for the segments kept too long or past the byte bound."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = held_dir(data_dir)

    def take(self, path: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.replace(path, self.directory / path.name)

    def segments(self) -> list[tuple[int, Path, int, float]]:
        """(number, path, bytes, modified at) of each held segment, oldest first."""
        found = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        for name in names:
            path = self.directory / name
            number = segment_number(path)
            if number is None or path.suffix != SEALED_SUFFIX:
                continue
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            found.append((number, path, info.st_size, info.st_mtime))
        return sorted(found)

    def segments_before(self, segment: int) -> int:
        """How many held segments are numbered below `segment`."""
        return sum(1 for number, _, _, _ in self.segments() if number < segment)

    def release_before(self, segment: int) -> int:
        """Delete the held segments numbered below `segment`; how many went."""
        released = 0
        for number, path, _, _ in self.segments():
            if number >= segment:
                break
            path.unlink(missing_ok=True)
            released += 1
        return released

    def over_bounds(self, now: float, horizon_s: float, max_bytes: int) -> list[int]:
        """Held segments that must go: older than `horizon_s`, or the oldest ones while
        all of them together are over `max_bytes`."""
        held = self.segments()
        total = sum(size for _, _, size, _ in held)
        due: list[int] = []
        for number, _, size, modified in held:
            if now - modified > horizon_s or total > max_bytes:
                due.append(number)
                total -= size
            else:
                break
        return due

    def drop(self, segment: int) -> None:
        (self.directory / f"{segment:012d}{SEALED_SUFFIX}").unlink(missing_ok=True)

    def clear(self) -> int:
        """Relaying is off: nothing is held for anyone. How many segments went."""
        held = self.segments()
        for _, path, _, _ in held:
            path.unlink(missing_ok=True)
        return len(held)
