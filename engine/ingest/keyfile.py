"""The key file: what a restarting receiver needs from the lake, kept beside it by the
lake writer, so the receiver recovers without reading Parquet (no DuckDB or polars in
its process).

`data_dir/lake.keys`, little-endian:

    magic     8 bytes   b"CSKEYS2\\n"
    entries   each: length (u32) | crc32 (u32) of what follows it | latest (f64) | JSON
              {"segment", "max_seq", "max_ts", "horizon_s", "keys": [[call_id, serial, ts], ...]}

One entry per lake write (of at most ENTRY_KEYS keys: a larger write is several
entries), appended and fsync'd before the journal segments it held are deleted;
`latest` is the latest ts among its keys. What the file says is the union of its
entries:

- `segment`: the highest journal segment whose reports it holds. A lake file named
  after a higher segment that is no longer journaled makes the file stale
  (`fresh_against`).
- `max_seq`, `max_ts`: the highest report sequence number and report time in the lake.
- the keys: every (call_id, serial, ts) of a report in the lake with ts within
  `horizon_s` of `max_ts` (and maybe some older: entries expire whole), but no more
  than the newest `max_keys` or so (store.max_dedup_keys: entries also expire whole
  once as many newer keys follow them).

It is read entry by entry (a first pass checks each and reads its state, a second
reads the keys of those within the horizon, one entry at a time), so reading holds
one entry's keys at a time, never the whole file: the receiver's memory at a
restart stays that of its key table.

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
import operator
import os
import re
import struct
import uuid
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from engine.ingest.journal import fsync_dir

MAGIC = b"CSKEYS2\n"
_ENTRY = struct.Struct("<IId")  # length of what follows the crc, crc32, latest
_HEAD = struct.Struct("<II")  # length of what follows the crc, crc32
_CHECKED = struct.Struct("<d")
# Keys in one entry at most (about 4.5 MiB of JSON).
ENTRY_KEYS = 100_000
# An entry's JSON is {state fields..., "keys": [...]}: the state is read without the keys.
_KEYS_AT = b',"keys":'

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
    # Where each entry is in `path`: (latest, start, end), oldest first.
    path: Path | None = field(default=None, compare=False, repr=False)
    entries: list[tuple[float, int, int]] = field(default_factory=list, compare=False, repr=False)
    # The file as it was read, kept open until `close`: the lake writer may rewrite
    # the key file (a new file renamed over it) meanwhile, and the entries above are
    # where they are in this one.
    source: BinaryIO | None = field(default=None, compare=False, repr=False)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None

    def __del__(self) -> None:
        # A recovery whose keys were never asked for lets its file go with it.
        self.close()

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

    def runs(self, since: float = float("-inf")) -> Iterator[list[StoredKey]]:
        """The keys with ts >= `since`, entry by entry, oldest entry first, read from
        the file as `read_key_file` found it (or, once closed, from `path` again)."""
        if self.path is None or not self.entries:
            return
        with contextlib.ExitStack() as stack:
            source = self.source
            if source is None:
                source = stack.enter_context(self.path.open("rb"))
            for latest, start, end in self.entries:
                if latest < since:
                    continue
                source.seek(start)
                data = source.read(end - start)
                try:
                    keys = orjson.loads(memoryview(data)[_ENTRY.size :])["keys"]
                    run = [(str(c), int(s), float(t)) for c, s, t in keys if t >= since]
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                    raise KeyFileError(f"malformed entry at byte {start}: {error}") from None
                if run:
                    yield run

    @property
    def keys(self) -> list[StoredKey]:
        """Every key, oldest entry first (for a look: the receiver uses `runs`)."""
        return [key for run in self.runs() for key in run]


# A key's time (its third part), read in C.
_TIME = operator.itemgetter(2)


def _entry(state: dict[str, Any], keys: list[StoredKey]) -> tuple[float, bytes]:
    latest = max(map(_TIME, keys), default=0.0)
    checked = _CHECKED.pack(latest) + orjson.dumps({**state, "keys": keys})
    return latest, struct.pack("<II", len(checked), zlib.crc32(checked)) + checked


def _scan(source: BinaryIO) -> Iterator[tuple[float, int, int, bytes]]:
    """(latest, start, end, checked bytes) of each whole entry after the magic, read one
    at a time; a torn last one is left out, a damaged one before others is a
    KeyFileError."""
    at = len(MAGIC)
    source.seek(at)
    while True:
        head = source.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return  # the end, or a torn header
        length, crc = _HEAD.unpack(head)
        checked = source.read(length)
        end = at + _HEAD.size + length
        if length < _CHECKED.size or len(checked) < length or zlib.crc32(checked) != crc:
            if len(checked) < length or not source.read(1) or _zeros_from(source, at):
                return  # torn: the last entry, cut short or followed by zeros
            raise KeyFileError(f"checksum mismatch in the entry at byte {at}")
        yield _CHECKED.unpack_from(checked)[0], at, end, checked
        at = end


def _zeros_from(source: BinaryIO, at: int) -> bool:
    """Whether the file holds only zero bytes from `at` to its end."""
    source.seek(at)
    while chunk := source.read(1 << 20):
        if chunk.strip(b"\0"):
            return False
    return True


def _state_of(checked: bytes, at: int) -> dict[str, Any]:
    """The state fields of an entry, read without its keys."""
    json = memoryview(checked)[_CHECKED.size :]
    cut = bytes(json[:4096]).find(_KEYS_AT)
    if cut < 0:
        raise KeyFileError(f"malformed entry at byte {at}: no keys")
    try:
        state = orjson.loads(bytes(json[:cut]) + b"}")
    except orjson.JSONDecodeError as error:
        raise KeyFileError(f"malformed entry at byte {at}: {error}") from None
    if not isinstance(state, dict):
        raise KeyFileError(f"malformed entry at byte {at}: not an object")
    return state


def read_key_file(path: Path, *, keep_open: bool = False) -> StoredKeys | None:
    """What the key file says, its keys left in the file (`StoredKeys.runs` reads
    them); None if there is none. Raises KeyFileError if damaged. `keep_open`: the
    file stays open (`StoredKeys.close`), so the keys are read from this file even if
    the lake writer renames a new one over it meanwhile."""
    try:
        source = path.open("rb")
    except FileNotFoundError:
        return None
    try:
        if source.read(len(MAGIC)) != MAGIC:
            raise KeyFileError("not a key file")
        stored = StoredKeys(horizon_s=float("inf"), path=path, source=source)
        for latest, start, end, checked in _scan(source):
            entry = _state_of(checked, start)
            try:
                stored.segment = max(stored.segment, int(entry["segment"]))
                stored.max_seq = max(stored.max_seq, int(entry["max_seq"]))
                stored.max_ts = max(stored.max_ts, float(entry["max_ts"]))
                stored.horizon_s = min(stored.horizon_s, float(entry["horizon_s"]))
            except (KeyError, TypeError, ValueError, OverflowError) as error:
                raise KeyFileError(f"malformed entry at byte {start}: {error}") from None
            stored.entries.append((latest, start, end))
        if stored.horizon_s == float("inf"):
            raise KeyFileError("no entry")
    except BaseException:
        source.close()
        raise
    if not keep_open:
        stored.close()
    return stored


class RecentKeys:
    """The lake writer's side: appends each lake write's keys to the key file, and
    rewrites it without the expired ones now and then: those older than the horizon,
    and those followed by `max_keys` newer ones."""

    def __init__(self, path: Path, horizon_s: float, max_keys: int | None = None) -> None:
        self.path = path
        self.horizon_s = horizon_s
        self.max_keys = max_keys
        self.segment = 0
        self.max_seq = 0
        self.max_ts = 0.0
        # (latest, size, keys) of each entry in the file, oldest first.
        self._sizes: deque[tuple[float, int, int]] = deque()

    def _state(self) -> dict[str, Any]:
        return {
            "segment": self.segment,
            "max_seq": self.max_seq,
            "max_ts": self.max_ts,
            "horizon_s": self.horizon_s,
        }

    def _entries(self, keys: list[StoredKey]) -> list[tuple[float, bytes, int]]:
        """`keys` as entries of at most ENTRY_KEYS keys (one entry when there are none)."""
        state = self._state()
        chunks = [keys[at : at + ENTRY_KEYS] for at in range(0, len(keys), ENTRY_KEYS)]
        return [(*_entry(state, chunk), len(chunk)) for chunk in chunks or [[]]]

    def reset(self, segment: int, max_seq: int, max_ts: float, keys: list[StoredKey]) -> None:
        """Start a new file from what the lake holds (a rebuild)."""
        self.segment, self.max_seq, self.max_ts = segment, max_seq, max_ts
        entries = self._entries(keys)
        self._replace([MAGIC, *(entry for _, entry, _ in entries)])
        self._sizes = deque((latest, len(entry), count) for latest, entry, count in entries)

    def add(self, segment: int, max_seq: int, max_ts: float, keys: list[StoredKey]) -> None:
        """The keys of a lake write that held journal segments up to `segment`. Durable
        when it returns; must return before those journal segments are deleted."""
        self.segment = max(self.segment, segment)
        self.max_seq = max(self.max_seq, max_seq)
        self.max_ts = max(self.max_ts, max_ts)
        entries = self._entries(keys)
        self._sizes.extend((latest, len(entry), count) for latest, entry, count in entries)
        expired = self._expired()
        if expired >= _REWRITE_MIN_BYTES and 2 * expired > sum(s for _, s, _ in self._sizes):
            try:
                self._rewrite([entry for _, entry, _ in entries])
            except BaseException:
                # The file is as it was: so is what this object says of it (the lake
                # writer tries the segment again, and would add its entries twice).
                for _ in entries:
                    self._sizes.pop()
                raise
            return
        with self.path.open("ab") as out:
            end = out.tell()
            try:
                for _, entry, _ in entries:
                    out.write(entry)
                out.flush()
                os.fsync(out.fileno())
            except OSError:
                # No half entry before the next one (that would read as damage).
                for _ in entries:
                    self._sizes.pop()
                with contextlib.suppress(OSError):
                    os.ftruncate(out.fileno(), end)
                raise

    def _kept(self) -> list[bool]:
        """Of each entry in `_sizes`: whether a rewrite keeps it (within the horizon,
        and fewer than `max_keys` newer keys after it)."""
        since = self.max_ts - self.horizon_s
        kept: list[bool] = []
        newer = 0
        for latest, _, count in reversed(self._sizes):
            kept.append(latest >= since and (self.max_keys is None or newer < self.max_keys))
            newer += count
        kept.reverse()
        return kept

    def _expired(self) -> int:
        return sum(
            size for (_, size, _), keep in zip(self._sizes, self._kept(), strict=True) if not keep
        )

    def _rewrite(self, new: list[bytes]) -> None:
        """The file without expired entries, then `new` (the last entries of `_sizes`).
        Each entry holds the state as it was written, so the last one holds all of it;
        and a file cut short anywhere says a lower `segment`, never the same one with
        keys missing. The kept entries are copied one at a time."""
        kept = self._kept()
        old = len(self._sizes) - len(new)
        with self.path.open("rb") as source:
            # The file holds the entries this object wrote, oldest first (`_sizes`
            # without `new`); matched from the newest, anything older is let go.
            found = [(start, end) for _, start, end, _ in _scan(source)][-old:] if old else []
            copies = [
                (start, end)
                for (start, end), keep in zip(found, kept[old - len(found) : old], strict=True)
                if keep
            ]

            def content() -> Iterator[bytes]:
                yield MAGIC
                for start, end in copies:
                    source.seek(start)
                    yield source.read(end - start)
                yield from new

            self._replace(content())
        known = old - len(found)  # entries of `_sizes` the file no longer held
        self._sizes = deque(
            sizes
            for sizes, keep in zip(list(self._sizes)[known:], kept[known:], strict=True)
            if keep
        )

    def _replace(self, content: Iterable[bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.partial"
        try:
            with open(partial, "xb") as out:
                for part in content:
                    out.write(part)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)
        fsync_dir(self.path.parent)
