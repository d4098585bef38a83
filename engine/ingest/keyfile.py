"""The key file: what a restarting receiver needs from the lake, kept beside it by the
lake writer, so the receiver recovers without reading Parquet (no DuckDB or polars in
its process).

`data_dir/lake.keys`, little-endian:

    magic     8 bytes   b"CSKEYS2\\n"
    entries   each: length (u32) | crc32 (u32) of what follows it | latest (f64) | JSON
              {"segment", "max_seq", "max_ts", "horizon_s", "keys": [[call_id, serial, ts], ...]}

One entry per lake write, appended and fsync'd before the journal segments it held
are deleted; `latest` is the latest ts among its keys. What the file says is the
union of its entries:

- `segment`: the highest journal segment whose reports it holds. A lake file named
  after a higher segment that is no longer journaled makes the file stale
  (`fresh_against`).
- `max_seq`, `max_ts`: the highest report sequence number and report time in the lake.
- the keys: every (call_id, serial, ts) of a report in the lake with ts within
  `horizon_s` of `max_ts` (and maybe some older: entries expire whole).

So every stored report is in the journal, in this file, or both; a receiver that
reads the sealed segments first and this file after misses none.

A torn last entry (a crash before its fsync, or a reader racing the append) is
dropped: its segments are still journaled, or else the lake is ahead of the file
and `fresh_against` says so. When expired entries outweigh the live ones, the file
is rewritten without them (temporary file, fsync, rename). A file that is missing,
damaged, made for a shorter dedup horizon, or behind the lake is not trusted: the
lake writer rebuilds it from the lake at its start, under its lock.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import uuid
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.ingest.journal import fsync_dir

MAGIC = b"CSKEYS2\n"
_ENTRY = struct.Struct("<IId")  # length of what follows the crc, crc32, latest
_CHECKED = struct.Struct("<d")
# Rewrite without expired entries once they take this much and more than the live ones.
_REWRITE_MIN_BYTES = 1 << 20

# (call_id, serial, ts) of one stored report.
StoredKey = tuple[str, int, float]

# Lake files are named after the journal segments they hold (engine.lake.parquet).
_LAKE_FILE = re.compile(r"^(?:seg-(\d{12})|(?:cmp|grp)-(\d{12})-(\d{12}))\.parquet$")


def key_file_path(data_dir: Path) -> Path:
    return data_dir / "lake.keys"


def segment_range(name: str) -> tuple[int, int] | None:
    """(first, last) journal segment a lake file's name says it holds, None if not one."""
    match = _LAKE_FILE.match(name)
    if match is None:
        return None
    if match.group(1) is not None:
        number = int(match.group(1))
        return number, number
    return int(match.group(2)), int(match.group(3))


def lake_segment_ranges(lake_root: Path) -> list[tuple[int, int]]:
    """The segment ranges of every file in the lake, from their names (no file is read)."""
    return sorted(
        rng
        for path in lake_root.glob("*/day=*/*.parquet")
        if (rng := segment_range(path.name)) is not None
    )


class KeyFileError(ValueError):
    """The key file is damaged or not one; the message says how."""


@dataclass
class StoredKeys:
    segment: int = 0
    max_seq: int = 0
    max_ts: float = 0.0
    horizon_s: float = 0.0
    keys: list[StoredKey] = field(default_factory=list)

    def fresh_against(
        self, lake_ranges: Iterable[tuple[int, int]], journaled: set[int], horizon_s: float
    ) -> str | None:
        """Why these keys cannot stand for the lake (None: they can). A lake file past
        `segment` whose last segment is still in the journal is covered by the journal:
        a group's last segment goes before the rest (see LakeWriter.settle)."""
        if self.horizon_s < horizon_s:
            return f"made for a dedup horizon of {self.horizon_s:g} s, not {horizon_s:g} s"
        ahead = [last for _, last in lake_ranges if last > self.segment and last not in journaled]
        if ahead:
            return f"the lake holds segments up to {max(ahead)}, the file up to {self.segment}"
        return None


def _entry(state: dict[str, Any], keys: list[StoredKey]) -> tuple[float, bytes]:
    latest = max((t for _, _, t in keys), default=0.0)
    checked = _CHECKED.pack(latest) + orjson.dumps({**state, "keys": keys})
    return latest, struct.pack("<II", len(checked), zlib.crc32(checked)) + checked


def _entries(data: bytes) -> list[tuple[float, int, int]]:
    """(latest, start, end) of each whole entry after the magic; a torn last one is left
    out, a damaged one before others is a KeyFileError."""
    found = []
    at = len(MAGIC)
    while at < len(data):
        if at + _ENTRY.size > len(data):
            break  # torn
        length, crc, latest = _ENTRY.unpack_from(data, at)
        end = at + 8 + length
        if length < _CHECKED.size or end > len(data) or zlib.crc32(data[at + 8 : end]) != crc:
            if end >= len(data) or not data[at:].strip(b"\0"):
                break  # torn: the last entry, cut short or followed by zeros
            raise KeyFileError(f"checksum mismatch in the entry at byte {at}")
        found.append((latest, at, end))
        at = end
    return found


def read_key_file(path: Path) -> StoredKeys | None:
    """The key file's content; None if there is none. Raises KeyFileError if damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if not data.startswith(MAGIC):
        raise KeyFileError("not a key file")
    stored = StoredKeys(horizon_s=float("inf"))
    entries = _entries(data)
    try:
        for _, start, end in entries:
            entry = orjson.loads(data[start + _ENTRY.size : end])
            stored.segment = max(stored.segment, int(entry["segment"]))
            stored.max_seq = max(stored.max_seq, int(entry["max_seq"]))
            stored.max_ts = max(stored.max_ts, float(entry["max_ts"]))
            stored.horizon_s = min(stored.horizon_s, float(entry["horizon_s"]))
            stored.keys.extend((c, s, t) for c, s, t in entry["keys"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as error:
        raise KeyFileError(f"malformed entry: {error}") from None
    if stored.horizon_s == float("inf"):
        raise KeyFileError("no entry")
    return stored


class RecentKeys:
    """The lake writer's side: appends each lake write's keys to the key file, and
    rewrites it without the expired ones now and then."""

    def __init__(self, path: Path, horizon_s: float) -> None:
        self.path = path
        self.horizon_s = horizon_s
        self.segment = 0
        self.max_seq = 0
        self.max_ts = 0.0
        # (latest, size) of each entry in the file, oldest first.
        self._sizes: deque[tuple[float, int]] = deque()

    def _state(self) -> dict[str, Any]:
        return {
            "segment": self.segment,
            "max_seq": self.max_seq,
            "max_ts": self.max_ts,
            "horizon_s": self.horizon_s,
        }

    def reset(self, segment: int, max_seq: int, max_ts: float, keys: list[StoredKey]) -> None:
        """Start a new file from what the lake holds (a rebuild)."""
        self.segment, self.max_seq, self.max_ts = segment, max_seq, max_ts
        latest, entry = _entry(self._state(), keys)
        self._replace(MAGIC + entry)
        self._sizes = deque([(latest, len(entry))])

    def add(self, segment: int, max_seq: int, max_ts: float, keys: list[StoredKey]) -> None:
        """The keys of a lake write that held journal segments up to `segment`. Durable
        when it returns; must return before those journal segments are deleted."""
        self.segment = max(self.segment, segment)
        self.max_seq = max(self.max_seq, max_seq)
        self.max_ts = max(self.max_ts, max_ts)
        latest, entry = _entry(self._state(), keys)
        self._sizes.append((latest, len(entry)))
        since = self.max_ts - self.horizon_s
        expired = sum(size for latest, size in self._sizes if latest < since)
        if expired >= _REWRITE_MIN_BYTES and 2 * expired > sum(s for _, s in self._sizes):
            self._rewrite(since, entry)
            return
        with self.path.open("ab") as out:
            end = out.tell()
            try:
                out.write(entry)
                out.flush()
                os.fsync(out.fileno())
            except OSError:
                # No half entry before the next one (that would read as damage).
                self._sizes.pop()
                with contextlib.suppress(OSError):
                    os.ftruncate(out.fileno(), end)
                raise

    def _rewrite(self, since: float, entry: bytes) -> None:
        """The file without expired entries, then `entry`. Each entry holds the state as
        it was written, so the last one holds all of it; and a file cut short anywhere
        says a lower `segment`, never the same one with keys missing."""
        data = self.path.read_bytes()
        parts = [MAGIC]
        sizes: deque[tuple[float, int]] = deque()
        for latest, start, end in _entries(data):
            if latest >= since:
                parts.append(data[start:end])
                sizes.append((latest, end - start))
        parts.append(entry)
        sizes.append(self._sizes[-1])
        self._replace(b"".join(parts))
        self._sizes = sizes

    def _replace(self, content: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.partial"
        try:
            with open(partial, "xb") as out:
                out.write(content)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)
        fsync_dir(self.path.parent)
