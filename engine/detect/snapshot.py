"""Detection state on disk: call tracker, rule windows, suppression and models.

A snapshot is taken between journal segments (never in the middle of one), so
it says exactly which reports it has seen: everything up to `position.seq`.
On start the lake writer restores it and carries on with the segments after
it; a restart therefore gives the same alerts as a run that never stopped.

The file (format v3):

    CALLSENTRY-DETECTION-SNAPSHOT v3\\n     magic line with the format's version
    32 bytes                                SHA-256 of the payload
    payload                                 pickle protocol 5 of a plain dict

The payload is `{"format": 3, "position": {"segment", "seq"}, "taken_at", "state"}`,
`state` being what `Pipeline.state()` returns. Every object of callsentry's own in
it is written by its *state type*, a stable name from `STATE_TYPES` with the
fields that type declares (`Snapshotted.state_fields`, or the attributes its
registration keeps), never as a Python class path: classes can move, be renamed or
change their internals, and a snapshot still says what it holds. Reading allows
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.detect.aggregates import FirstSeenState, SequentialState, SpikeState
from engine.detect.alerts import AlertManager
from engine.detect.calls import Call, CallTracker, DeadlineQueue, TrackerStats
from engine.detect.windows import CountState, EwBaseline, KeyedState, Snapshotted, ValueState

log = logging.getLogger(__name__)

MAGIC_PREFIX = b"CALLSENTRY-DETECTION-SNAPSHOT "
FORMAT = 3
MAGIC = MAGIC_PREFIX + f"v{FORMAT}\n".encode()
SNAPSHOT_NAME = "detection.snapshot"
# Formats this release reads: its own, and earlier ones through engine.detect.migrations.
READABLE = ("v2", f"v{FORMAT}")


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


class SnapshotError(Exception):
    pass


# -- state types: the schema ------------------------------------------------------

StateOf = Callable[[Any], dict[str, Any]]
Revive = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class StateType:
    name: str
    cls: type
    state_of: StateOf
    revive: Revive


STATE_TYPES: dict[str, StateType] = {}
_BY_CLASS: dict[type, StateType] = {}


def _snapshotted_state(obj: Any) -> dict[str, Any]:
    state: dict[str, Any] = obj.__getstate__()
    return state


def _snapshotted_revive(cls: type) -> Revive:
    def revive(fields: dict[str, Any]) -> Any:
        # Every Snapshotted class can be made with no arguments (see windows.Snapshotted).
        obj = cls()
        obj.__setstate__(fields)
        return obj

    return revive


def _attributes_state(keep: tuple[str, ...] | None, drop: tuple[str, ...]) -> StateOf:
    def state_of(obj: Any) -> dict[str, Any]:
        names = keep if keep is not None else tuple(vars(obj))
        return {name: getattr(obj, name) for name in names if name not in drop}

    return state_of


def _attributes_revive(cls: type) -> Revive:
    def revive(fields: dict[str, Any]) -> Any:
        obj: Any = object.__new__(cls)
        obj.__dict__.update(fields)
        return obj

    return revive


def register_state_type(
    name: str,
    cls: type,
    *,
    keep: tuple[str, ...] | None = None,
    drop: tuple[str, ...] = (),
    state_of: StateOf | None = None,
    revive: Revive | None = None,
) -> None:
    """Name how `cls` is written in snapshots. A `Snapshotted` class writes its
    `state_fields`; another writes its attributes (`keep`, or all of them but `drop`:
    what is rebuilt from configuration, such as a model's spec, is dropped), unless
    `state_of`/`revive` say otherwise. A name is never reused for another meaning:
    a changed shape gets a new name and a migration (engine.detect.migrations)."""
    if issubclass(cls, Snapshotted):
        state_of = state_of or _snapshotted_state
        revive = revive or _snapshotted_revive(cls)
    else:
        state_of = state_of or _attributes_state(keep, drop)
        revive = revive or _attributes_revive(cls)
    known = STATE_TYPES.get(name)
    if known is not None and known.cls is not cls:
        raise ValueError(f"state type {name!r} is already {known.cls.__qualname__}")
    entry = StateType(name, cls, state_of, revive)
    STATE_TYPES[name] = entry
    _BY_CLASS[cls] = entry


def _call_state(call: Call) -> dict[str, Any]:
    made_with = (call.call_id, call.caller, call.callee, call.forward, call.menu_id)
    return {"made_with": (*made_with, call.menu_name, call.started_at), **call.__getstate__()}


def _call_revive(fields: dict[str, Any]) -> Call:
    fields = dict(fields)
    call = Call(*fields.pop("made_with"))
    call.__setstate__(fields)
    return call


def _alert_manager_revive(fields: dict[str, Any]) -> AlertManager:
    manager = AlertManager()
    for name, value in fields.items():
        setattr(manager, name, value)
    return manager


register_state_type("call", Call, state_of=_call_state, revive=_call_revive)
register_state_type("call-tracker", CallTracker)
register_state_type("call-tracker-stats", TrackerStats)
register_state_type("deadline-queue", DeadlineQueue)
register_state_type("alert-manager", AlertManager, revive=_alert_manager_revive)
register_state_type("keyed-state", KeyedState)
register_state_type("count-window", CountState)
register_state_type("value-window", ValueState)
register_state_type("spike-window", SpikeState)
register_state_type("first-seen-window", FirstSeenState)
register_state_type("sequential-window", SequentialState)
register_state_type("ew-baseline", EwBaseline)


def revive(name: str, fields: dict[str, Any]) -> Any:
    """An object of state type `name` from its fields (what the payload calls)."""
    entry = STATE_TYPES.get(name)
    if entry is None:
        raise SnapshotError(f"unknown state type {name!r}")
    return entry.revive(fields)


# Our own packages: an object of theirs with no state type is an error when writing
# (it would be written by class path, which the reader refuses).
_OWN_PACKAGES = ("engine.", "models.")


class _StatePickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # Called for objects of non-builtin types only: plain data costs nothing here.
        entry = _BY_CLASS.get(type(obj))
        if entry is not None:
            return revive, (entry.name, entry.state_of(obj))
        module = getattr(type(obj), "__module__", "")
        if module.startswith(_OWN_PACKAGES):
            raise SnapshotError(
                f"{module}.{type(obj).__qualname__} has no state type "
                "(engine.detect.snapshot.register_state_type)"
            )
        return NotImplemented


# What a payload may name besides `revive`: the containers and statistics objects
# are made of. River's statistics and trees are written by River's own pickling.
_ALLOWED_GLOBALS = {
    ("engine.detect.snapshot", "revive"),
    ("collections", "OrderedDict"),
    ("collections", "deque"),
    ("collections", "defaultdict"),
    ("array", "array"),
    ("array", "_array_reconstructor"),
    ("random", "Random"),
    ("functools", "partial"),
    ("copyreg", "_reconstructor"),
    ("copyreg", "__newobj__"),
    ("builtins", "object"),
    ("builtins", "float"),
    ("builtins", "int"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "getattr"),
}
_ALLOWED_PACKAGES = ("river.",)


def allowed_global(module: str, name: str) -> bool:
    return (module, name) in _ALLOWED_GLOBALS or (
        module.startswith(_ALLOWED_PACKAGES) and not name.startswith("__")
    )


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not allowed_global(module, name):
            raise SnapshotError(f"refers to {module}.{name}, which a snapshot may not hold")
        return super().find_class(module, name)


def encode(snapshot: Snapshot) -> bytes:
    """The payload of `snapshot` (format v3)."""
    document = {
        "format": FORMAT,
        "position": {"segment": snapshot.position.segment, "seq": snapshot.position.seq},
        "taken_at": snapshot.taken_at,
        "state": snapshot.state,
    }
    buffer = io.BytesIO()
    _StatePickler(buffer, protocol=5).dump(document)
    return buffer.getvalue()


def decode(payload: bytes) -> Snapshot:
    """A snapshot from a v3 payload; SnapshotError if it is not one."""
    try:
        document = _StateUnpickler(io.BytesIO(payload)).load()
    except SnapshotError:
        raise
    except Exception as error:  # a damaged payload can fail in almost any way
        raise SnapshotError(f"cannot be decoded ({type(error).__name__}: {error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SnapshotError("holds no v3 snapshot document")
    try:
        position = Position(int(document["position"]["segment"]), int(document["position"]["seq"]))
        state = document["state"]
        taken_at = float(document["taken_at"])
    except (KeyError, TypeError, ValueError) as error:
        raise SnapshotError(f"snapshot document lacks {error}") from None
    if not isinstance(state, dict):
        raise SnapshotError("snapshot state is not a mapping")
    return Snapshot(position, state, taken_at)


# -- files --------------------------------------------------------------------------


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
    payload = encode(snapshot)
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
            f"reads {' and '.join(READABLE)})"
        )
    digest, payload = rest[:32], rest[32:]
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError("checksum mismatch (truncated or damaged)")
    if version == f"v{FORMAT}":
        return decode(payload)
    from engine.detect.migrations import migrate

    return migrate(version, payload)


def load(path: Path) -> Snapshot | None:
    """The snapshot at `path`, or None (none yet, or unusable: reported and set aside)."""
    if not path.exists():
        return None
    try:
        return read(path.read_bytes())
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
