"""Detection state as data: what a snapshot holds and the names its parts go by.

Every object of callsentry's own in a snapshot is written by its *state type*: a
stable name registered here (`register_state_type`) with the fields that type
declares, never its Python class path. The names are the snapshot's schema: a class
may move, be renamed or change its internals, and a snapshot still says what it
holds; a changed shape gets a new name and a conversion in engine.detect.migrations.
Detection's own types are registered here; the models register theirs
(models/state_types.py). `allowed_global` says what else a payload may name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

from engine.core.positions import Position
from engine.detect.aggregates import (
    FirstSeenState,
    NewValueState,
    SequentialState,
    ShareState,
    SpikeState,
)
from engine.detect.alerts import AlertManager
from engine.detect.calls import Call, CallTracker, DeadlineQueue, TrackerStats
from engine.detect.conduct import Conduct, ConductLedger, Peers
from engine.detect.windows import (
    Bucket,
    CountState,
    EwBaseline,
    Folded,
    KeyedState,
    Snapshotted,
    ValueState,
)


@dataclass(frozen=True)
class Snapshot:
    # How far the state goes: the last journal segment and report fed to it.
    position: Position
    state: dict[str, Any]
    taken_at: float


class SnapshotError(Exception):
    pass


def snapshot_of(document: Any, version: int) -> Snapshot:
    """The snapshot a decoded payload document of format `version` holds (v3 and later:
    `{"format", "position": {"segment", "seq"}, "taken_at", "state"}`)."""
    if not isinstance(document, dict) or document.get("format") != version:
        raise SnapshotError(f"holds no v{version} snapshot document")
    try:
        position = Position(int(document["position"]["segment"]), int(document["position"]["seq"]))
        state = document["state"]
        taken_at = float(document["taken_at"])
    except (KeyError, TypeError, ValueError) as error:
        raise SnapshotError(f"snapshot document lacks {error}") from None
    if not isinstance(state, dict):
        raise SnapshotError("snapshot state is not a mapping")
    return Snapshot(position, state, taken_at)


StateOf = Callable[[Any], dict[str, Any]]
Revive = Callable[[dict[str, Any]], Any]
# The state type an object is written as, and its fields (for a class that has more
# than one form: a keyed state of one class of values is written as rows).
Written = Callable[[Any], tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class StateType:
    name: str
    cls: type
    state_of: StateOf
    revive: Revive
    chosen: Written | None = None
    # Written as a `Snapshotted` class's `state_fields` (and so may be written as rows).
    snapshotted: bool = False

    def written(self, obj: Any) -> tuple[str, dict[str, Any]]:
        """The state type `obj` is written as and its fields."""
        if self.chosen is not None:
            return self.chosen(obj)
        return self.name, self.state_of(obj)


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
    written: Written | None = None,
    read_only: bool = False,
) -> None:
    """Name how `cls` is written in snapshots. A `Snapshotted` class writes its
    `state_fields`; another writes its attributes (`keep`, or all of them but `drop`:
    what is rebuilt from configuration, such as a model's spec, is dropped), unless
    `state_of`/`revive` say otherwise; `written` chooses among its names object by
    object, and a `read_only` name is one `cls` is read from but not written as. A
    name is never reused for another meaning: a changed shape gets a new name and a
    migration (engine.detect.migrations)."""
    snapshotted = issubclass(cls, Snapshotted) and state_of is None and revive is None
    if issubclass(cls, Snapshotted):
        state_of = state_of or _snapshotted_state
        revive = revive or _snapshotted_revive(cls)
    else:
        state_of = state_of or _attributes_state(keep, drop)
        revive = revive or _attributes_revive(cls)
    known = STATE_TYPES.get(name)
    if known is not None and known.cls is not cls:
        raise ValueError(f"state type {name!r} is already {known.cls.__qualname__}")
    entry = StateType(name, cls, state_of, revive, written, snapshotted)
    STATE_TYPES[name] = entry
    if not read_only:
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


def _keyed_written(keyed: KeyedState[Any]) -> tuple[str, dict[str, Any]]:
    """A keyed state whose values are all of one `Snapshotted` class is written as
    rows ("keyed-rows"): the keys in their order, the class's state type and fields
    once, and the values' fields in one list. Pickled as a dict of fields per value,
    a million callers' states would cost a dict, a tuple and memo entries each.
    Written so, a value is no object pickling remembers: it must be held by this keyed
    state alone (true of every keyed state's values: the callers' conduct, a caller
    model's states, a rule's windows), or it would be read back as two objects."""
    states = keyed.states
    if states:
        first = next(iter(states.values()))
        cls = type(first)
        entry = _BY_CLASS.get(cls)
        if (
            entry is not None
            and entry.snapshotted
            and all(type(value) is cls for value in states.values())
        ):
            return "keyed-rows", {
                "max_keys": keyed.max_keys,
                "evicted": keyed.evicted,
                "values": entry.name,
                "fields": first.state_fields(),
                "keys": list(states),
                # Every value's fields one after the other, in the keys' order.
                "rows": list(chain.from_iterable(map(cls.state_row, states.values()))),
            }
    return "keyed-state", _snapshotted_state(keyed)


def _keyed_rows_revive(fields: dict[str, Any]) -> KeyedState[Any]:
    entry = STATE_TYPES.get(fields["values"])
    if entry is None or not entry.snapshotted:
        raise SnapshotError(f"keyed rows of {fields['values']!r}, not a snapshotted type")
    names = tuple(fields["fields"])
    keys = list(fields["keys"])
    flat = fields["rows"]
    width = len(names)
    if type(flat) is not list or len(flat) != width * len(keys):
        raise SnapshotError(f"keyed rows of {entry.name!r} do not match their fields and keys")
    cls = entry.cls
    rows = (tuple(flat[at * width : (at + 1) * width]) for at in range(len(keys)))
    values: list[Any] = []
    if names == cls().state_fields():
        for row in rows:
            value = cls()
            value.set_row(row)
            values.append(value)
    else:
        # Written with other fields than the class has now: field by field, by name.
        values = [entry.revive(dict(zip(names, row, strict=True))) for row in rows]
    keyed: KeyedState[Any] = KeyedState()
    keyed.__setstate__(
        {
            "max_keys": fields["max_keys"],
            "states": dict(zip(keys, values, strict=True)),
            "evicted": fields["evicted"],
        }
    )
    return keyed


register_state_type("keyed-state", KeyedState, written=_keyed_written)
register_state_type("keyed-rows", KeyedState, revive=_keyed_rows_revive, read_only=True)
register_state_type("count-window", CountState)
register_state_type("value-window", ValueState)
register_state_type("spike-window", SpikeState)
register_state_type("first-seen-window", FirstSeenState)
register_state_type("sequential-window", SequentialState)
register_state_type("new-value-window", NewValueState)
register_state_type("share-window", ShareState)
register_state_type("ew-baseline", EwBaseline)
register_state_type("folded-window", Folded)
register_state_type("window-bucket", Bucket)
register_state_type("conduct-ledger", ConductLedger)
register_state_type("caller-conduct", Conduct)
register_state_type("conduct-peers", Peers)


def state_type_of(cls: type) -> StateType | None:
    """The state type `cls` is written as (None: it has none)."""
    return _BY_CLASS.get(cls)


def revive(name: str, fields: dict[str, Any]) -> Any:
    """An object of state type `name` from its fields (what the payload calls)."""
    entry = STATE_TYPES.get(name)
    if entry is None:
        raise SnapshotError(f"unknown state type {name!r}")
    return entry.revive(fields)


# What a payload may name besides `revive`: the containers and statistics objects
# are made of. River's statistics and trees are written by River's own pickling.
_ALLOWED_GLOBALS = {
    ("engine.detect.state", "revive"),
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
}
_ALLOWED_PACKAGES = ("river.",)


def allowed_global(module: str, name: str) -> bool:
    """Whether a payload may name `module.name`: one of the globals above, or a class
    of River's by its plain name (no dotted path: pickle would follow it to anything
    reachable from the module, `os.system` among them)."""
    return (module, name) in _ALLOWED_GLOBALS or (
        module.startswith(_ALLOWED_PACKAGES) and name.isidentifier() and not name.startswith("_")
    )


def checked_global(module: str, name: str, found: object) -> object:
    """`found` (what `module.name` is) if a payload may use it: River's must be classes."""
    if (module, name) not in _ALLOWED_GLOBALS and not isinstance(found, type):
        raise SnapshotError(f"refers to {module}.{name}, which is not a class")
    return found
