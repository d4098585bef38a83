"""Detection state on disk: call tracker, rule windows, suppression and models.

A snapshot is taken between journal segments (never in the middle of one), so
it says exactly which reports it has seen: everything up to `position.seq`.
On start the lake writer restores it and carries on with the segments after
it; a restart therefore gives the same alerts as a run that never stopped.

The file (format v4):

    CALLSENTRY-DETECTION-SNAPSHOT v4\\n     magic line with the format's version
    32 bytes                                SHA-256 of the payload
    payload                                 pickle protocol 5 of a plain dict

The payload is a run of pickles: first `{"format": 4, "position": {"segment", "seq"},
"taken_at", "parts": n}`, then n `(path, value)`, `state` (what `Pipeline.state()`
returns) cut at its first two levels: each rule's and each model's state is a part
(path `("rules", rule_id)`), as is the call tracker (`("tracker",)`). Each part is
pickled on its own, so what pickling keeps while it runs (an entry per object it
wrote) is at most one part's, not the whole state's, and the payload goes to the
file as it is made rather than into one buffer: a snapshot adds little to the lake
writer's peak memory (bench/README.md, "Memory"). Parts share no object (a test
compares a restored state's alerts with an uninterrupted run's). Every object of callsentry's own in
it is written by its *state type*, a stable name registered in engine.detect.state with the
fields that type declares (`Snapshotted.state_fields`, or the attributes its
registration keeps), never as a Python class path: classes can move, be renamed or
change their internals, and a snapshot still says what it holds. A keyed state whose
values are all of one such class (every caller's conduct) is written as rows: the
class's state type and fields once, then each value's fields in one list. Reading allows
those state types, plain containers, and the third-party statistics the models
keep (River's, and the few standard-library types they are made of); anything
else in a file is refused, so a snapshot cannot run code.

The file is written to a temporary name, fsync'd and renamed over the old one,
so a crash leaves the old snapshot or the new one, never half of one. A file
that fails the magic line or the checksum, or does not decode, is reported, set
aside as `*.corrupt-…`, and detection starts cold (the lake still holds every
event). Snapshots of an earlier format are read once through
`engine.detect.migrations`, so an upgrade is not a cold start.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from engine.core.positions import Position
from engine.core.runtime import collector_held_off
from engine.detect.snapshotfile import partial_path, put_in_place, set_aside
from engine.detect.state import (
    Snapshot,
    SnapshotError,
    allowed_global,
    checked_global,
    revive,
    snapshot_of,
    state_type_of,
)

if TYPE_CHECKING:
    from engine.detect.pipeline import Pipeline

log = logging.getLogger(__name__)

MAGIC_PREFIX = b"CALLSENTRY-DETECTION-SNAPSHOT "
FORMAT = 4
MAGIC = MAGIC_PREFIX + f"v{FORMAT}\n".encode()
# Formats this release reads: its own, and earlier ones through engine.detect.migrations.
READABLE = ("v2", "v3", f"v{FORMAT}")


# Our own packages: an object of theirs with no state type is an error when writing
# (it would be written by class path, which the reader refuses).
_OWN_PACKAGES = ("engine.", "models.")


class _StatePickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # Called for objects of non-builtin types only: plain data costs nothing here.
        entry = state_type_of(type(obj))
        if entry is not None:
            return revive, entry.written(obj)
        module = getattr(type(obj), "__module__", "")
        if module.startswith(_OWN_PACKAGES):
            raise SnapshotError(
                f"{module}.{type(obj).__qualname__} has no state type "
                "(engine.detect.state.register_state_type)"
            )
        return NotImplemented


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not allowed_global(module, name):
            raise SnapshotError(f"refers to {module}.{name}, which a snapshot may not hold")
        return checked_global(module, name, super().find_class(module, name))


def _parts(state: dict[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    parts: list[tuple[tuple[str, ...], Any]] = []
    for key, value in state.items():
        if type(value) is dict and value:
            parts.extend(((key, inner), part) for inner, part in value.items())
        else:
            parts.append(((key,), value))
    return parts


def write_payload(out: BinaryIO, snapshot: Snapshot) -> None:
    """The payload of `snapshot` (this format), written to `out` part by part."""
    with collector_held_off():
        _write_payload(out, snapshot)


def _write_payload(out: BinaryIO, snapshot: Snapshot) -> None:
    parts = _parts(snapshot.state)
    header = {
        "format": FORMAT,
        "position": {"segment": snapshot.position.segment, "seq": snapshot.position.seq},
        "taken_at": snapshot.taken_at,
        "parts": len(parts),
    }
    _StatePickler(out, protocol=5).dump(header)
    for part in parts:
        _StatePickler(out, protocol=5).dump(part)


def encode(snapshot: Snapshot) -> bytes:
    """The payload of `snapshot` (this format) as bytes."""
    buffer = io.BytesIO()
    write_payload(buffer, snapshot)
    return buffer.getvalue()


def decode(payload: bytes) -> Snapshot:
    """A snapshot from a payload of this format; SnapshotError if it is not one."""
    with collector_held_off():
        return _decode(payload)


def _decode(payload: bytes) -> Snapshot:
    source = io.BytesIO(payload)
    try:
        header = _StateUnpickler(source).load()
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise SnapshotError(f"holds no v{FORMAT} snapshot header")
        count = header.get("parts")
        if type(count) is not int or count < 0:
            raise SnapshotError("snapshot header lacks its number of parts")
        state: dict[str, Any] = {}
        for _ in range(count):
            part = _StateUnpickler(source).load()
            if not (
                isinstance(part, tuple)
                and len(part) == 2
                and isinstance(part[0], tuple)
                and len(part[0]) in (1, 2)
                and all(type(key) is str for key in part[0])
            ):
                raise SnapshotError("a part of the snapshot is not (path, value)")
            path, value = part
            if len(path) == 1:
                state[path[0]] = value
            else:
                inner = state.setdefault(path[0], {})
                if type(inner) is not dict:
                    raise SnapshotError(f"snapshot part {path} is inside a value, not a mapping")
                inner[path[1]] = value
        if source.read(1):
            raise SnapshotError("snapshot has bytes after its last part")
    except SnapshotError:
        raise
    except Exception as error:  # a damaged payload can fail in almost any way
        raise SnapshotError(f"cannot be decoded ({type(error).__name__}: {error})") from None
    return snapshot_of({**header, "state": state}, FORMAT)


class _Digesting:
    """A file that also hashes what is written to it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)


# -- files --------------------------------------------------------------------------


def save(path: Path, snapshot: Snapshot) -> int:
    """Write atomically; returns the size in bytes."""
    size = prepare(path, snapshot)
    put_in_place(path)
    return size


def prepare(path: Path, snapshot: Snapshot) -> int:
    """The first half of `save`: the snapshot written durably beside `path`, where
    `put_in_place` makes it the one a restart loads (replay prepares it while the
    lake is written, and puts it in place once the lake holds all it has seen)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        with partial.open("wb") as out:
            out.write(MAGIC)
            out.write(bytes(32))  # the digest, written once the payload is
            payload = _Digesting(out)
            write_payload(cast(BinaryIO, payload), snapshot)
            out.seek(len(MAGIC))
            out.write(payload.digest.digest())
            out.flush()
            os.fsync(out.fileno())
    except OSError:
        # Cut short by a full disk: its space is better free, and it is never loaded.
        partial.unlink(missing_ok=True)
        raise
    return len(MAGIC) + 32 + payload.size


def read(data: bytes) -> Snapshot:
    """A snapshot from a file's bytes, of this format or (through the migrations) an
    earlier one; SnapshotError says why not."""
    if not data.startswith(MAGIC_PREFIX):
        raise SnapshotError("not a detection snapshot (bad magic line)")
    version_line, _, rest = data[len(MAGIC_PREFIX) :].partition(b"\n")
    version = version_line.decode("ascii", "replace")
    if version not in READABLE:
        raise SnapshotError(
            f"written by another version of callsentry (snapshot {version}; this one "
            f"reads {', '.join(READABLE[:-1])} and {READABLE[-1]})"
        )
    digest, payload = rest[:32], rest[32:]
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError("checksum mismatch (truncated or damaged)")
    if version == f"v{FORMAT}":
        return decode(payload)
    from engine.detect.migrations import migrate

    try:
        return migrate(version, payload)
    except SnapshotError:
        raise
    except Exception as error:  # a file of an unexpected shape can fail in any way
        raise SnapshotError(
            f"cannot be read as {version} ({type(error).__name__}: {error})"
        ) from None


def load(path: Path, *, set_aside_unusable: bool = True) -> Snapshot | None:
    """The snapshot at `path`, or None (none yet, or unusable: reported and set aside).
    Without `set_aside_unusable` (a process that does not hold the data dir), an
    unusable one is left as it is, unreported, and SnapshotError raised."""
    if not path.exists():
        return None
    try:
        return read(path.read_bytes())
    except (OSError, SnapshotError) as error:
        if not set_aside_unusable:
            raise SnapshotError(str(error)) from None
        log.error(
            "detection snapshot %s is unusable: %s; starting detection cold (kept as %s)",
            path,
            error,
            set_aside(path),
        )
        return None


def restore_into(
    pipeline: Pipeline, path: Path, *, set_aside_unusable: bool = True
) -> tuple[Position, int] | None:
    """Give `pipeline` the state of the snapshot at `path`: the position it goes up to
    and how many rules and models it held (the callers' conduct is neither); None
    when there is none, or none usable (reported and set aside: `pipeline` stays
    cold). Without `set_aside_unusable`, an unusable one is left as it is and
    SnapshotError raised (`pipeline` cold)."""
    snapshot = load(path, set_aside_unusable=set_aside_unusable)
    if snapshot is None:
        return None
    fresh = pipeline.state()
    try:
        restored = pipeline.restore(snapshot.state)
    except Exception as error:  # state of an unexpected shape can fail in any way
        pipeline.restore(fresh)
        if not set_aside_unusable:
            raise SnapshotError(f"does not fit this release's detection ({error})") from None
        aside = set_aside(path)
        log.error(
            "detection snapshot %s does not fit this release's detection "
            "(%s: %s); starting detection cold (kept as %s)",
            path,
            type(error).__name__,
            error,
            aside,
        )
        return None
    from engine.detect.conduct import CONDUCT_KEPT

    return snapshot.position, sum(1 for kept in restored if kept != CONDUCT_KEPT)
