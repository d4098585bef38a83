"""Detection state on disk: call tracker, rule windows, suppression and models.

A snapshot is taken between journal segments (never in the middle of one), so
it says exactly which reports it has seen: everything up to `position.seq`.
On start the lake writer restores it and carries on with the segments after
it; a restart therefore gives the same alerts as a run that never stopped.

The file is written to a temporary name, fsync'd and renamed over the old one,
so a crash leaves the old snapshot or the new one, never half of one. It starts
with a magic line and a SHA-256 of the rest; a file that fails either check, or
does not unpickle, is reported, set aside as `*.corrupt`, and detection starts
cold (the lake still holds every event). Snapshots are pickles: they are read
only from the engine's own data directory, never from elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The version changes whenever the classes pickled in a snapshot move or change
# shape (v2: rule state classes in engine.detect.windows, detection compiled; v3: the
# aggregates' own state classes in engine.detect.aggregates, the caller model's state
# a CallerState). A snapshot of another version is set aside and detection starts cold.
_MAGIC_PREFIX = b"CALLSENTRY-DETECTION-SNAPSHOT "
MAGIC = _MAGIC_PREFIX + b"v3\n"
SNAPSHOT_NAME = "detection.snapshot"


@dataclass(frozen=True)
class Position:
    """How far the state goes: the last journal segment and report sequence fed to it."""

    segment: int
    seq: int


@dataclass(frozen=True)
class Snapshot:
    position: Position
    state: dict[str, Any]
    taken_at: float


def snapshot_path(data_dir: Path) -> Path:
    return data_dir / "state" / SNAPSHOT_NAME


def save(path: Path, snapshot: Snapshot) -> int:
    """Write atomically; returns the size in bytes."""
    size = prepare(path, snapshot)
    put_in_place(path)
    return size


def prepare(path: Path, snapshot: Snapshot) -> int:
    """The first half of `save`: the snapshot written durably beside `path`, where
    `put_in_place` makes it the one a restart loads (replay prepares it while the
    lake is written, and puts it in place once the lake holds all it has seen)."""
    payload = pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _partial(path).open("wb") as out:
        out.write(MAGIC)
        out.write(hashlib.sha256(payload).digest())
        out.write(payload)
        out.flush()
        os.fsync(out.fileno())
    return len(MAGIC) + 32 + len(payload)


def put_in_place(path: Path) -> None:
    os.replace(_partial(path), path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class SnapshotError(Exception):
    pass


def _read(path: Path) -> Snapshot:
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        if data.startswith(_MAGIC_PREFIX):
            version = data[len(_MAGIC_PREFIX) :].split(b"\n", 1)[0].decode("ascii", "replace")
            raise SnapshotError(
                f"written by another version of callsentry (snapshot {version}; this one "
                f"reads {MAGIC[len(_MAGIC_PREFIX) :].decode().strip()})"
            )
        raise SnapshotError("not a detection snapshot (bad magic line)")
    digest, payload = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError("checksum mismatch (truncated or damaged)")
    try:
        snapshot = pickle.loads(payload)
    except Exception as error:  # an unpickling failure can be almost any exception
        raise SnapshotError(f"cannot be unpickled ({type(error).__name__}: {error})") from None
    if not isinstance(snapshot, Snapshot):
        raise SnapshotError(f"holds a {type(snapshot).__name__}, not a snapshot")
    return snapshot


def load(path: Path) -> Snapshot | None:
    """The snapshot at `path`, or None (none yet, or unusable: reported and set aside)."""
    if not path.exists():
        return None
    try:
        return _read(path)
    except (OSError, SnapshotError) as error:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        log.error(
            "detection snapshot %s is unusable: %s; starting detection cold (kept as %s)",
            path,
            error,
            aside.name,
        )
        try:
            os.replace(path, aside)
        except OSError as rename_error:
            log.error("could not set the snapshot aside: %s", rename_error)
        return None
