"""Snapshots of earlier formats, read once into today's state (see engine.detect.snapshot).

Format v3 (the releases of 2026-12-05) is today's container; the models' anomaly
models in it are River pipelines made at once, which today are `model.anomaly` state
(made on their first full window, models/scoring.py): each is wrapped as one whose
River part is made already (it goes on as the pipeline it wraps would); and a menu's
window of calls, a deque of tuples in it, is today's columns (`model.call-window`). It
is read with today's checks; only `revive` is routed through the conversions below.

Format v2 (the releases of 2026-12-02 to 2026-12-05) pickled the pipeline's state as
Python objects by class path. It is read here, and only here, with an unpickler that
resolves each of callsentry's class paths to a stand-in recording what the pickle
gave it (constructor arguments, state); the standard containers and River's objects
load as themselves. The stand-ins are then turned into today's objects through the
state types of engine.detect.state, after each older shape is brought to today's
(the conversions below, oldest first). So an upgrade carries on from the last
snapshot rather than starting detection cold.

Anything a v2 file names beyond those classes is refused, as in v3.

A model added later (the forward-ramp model, `model.forward*` state types) is new
state, not a new shape of old state: a snapshot written before it holds nothing of
it, so that model starts cold from the snapshot's position while every other rule
and model carries on, and the format stays v4 (tests/test_models.py reads the v2, v3
and v4 files of tests/data with today's models).
"""

from __future__ import annotations

import heapq
import io
import math
import pickle
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from engine.core.positions import Position
from engine.detect.state import (
    Snapshot,
    SnapshotError,
    allowed_global,
    checked_global,
    revive,
    snapshot_of,
)

# v2 class paths -> today's state type names.
V2_STATE_TYPES = {
    "engine.detect.calls.Call": "call",
    "engine.detect.calls.CallTracker": "call-tracker",
    "engine.detect.calls.TrackerStats": "call-tracker-stats",
    "engine.detect.calls.DeadlineQueue": "deadline-queue",
    "engine.detect.alerts.AlertManager": "alert-manager",
    "engine.detect.windows.KeyedState": "keyed-state",
    "engine.detect.windows.CountState": "count-window",
    "engine.detect.windows.ValueState": "value-window",
    "engine.detect.windows.SpikeState": "spike-window",
    "engine.detect.windows.FirstSeenState": "first-seen-window",
    "engine.detect.windows.SequentialState": "sequential-window",
    "engine.detect.windows.EwBaseline": "ew-baseline",
    "models.caller.CallerModel": "model.caller",
    "models.menu.MenuModel": "model.menu",
    "models.menu._MenuState": "model.menu-state",
    "models.menu._Traffic": "model.menu-traffic",
    "models.menu.SeasonalVolume": "model.seasonal-volume",
    "models.scoring.Baseline": "model.baseline",
    "models.scoring.AdaptiveThreshold": "model.adaptive-threshold",
}
# v2 classes whose objects are not kept as such (converted where they are used).
_V2_OTHERS = {
    "engine.detect.snapshot.Snapshot",
    "engine.detect.snapshot.Position",
    "models.menu._Seen",
    "models.spec.ModelSpec",
    "models.spec.FeatureSpec",
    "models.spec.HalfSpaceTreesSpec",
    "models.spec.ThresholdSpec",
}


class _Recorded:
    """What a v2 pickle gave one of callsentry's objects: the arguments it was made
    with (when it was made by a call) and its state."""

    path = ""
    args: tuple[Any, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.fields.update(kwargs)

    @property
    def fields(self) -> dict[str, Any]:
        # Made on first use: an object unpickled by `__new__` alone never ran __init__.
        found: dict[str, Any] = self.__dict__.setdefault("_fields", {})
        return found

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            # (dict state, slots state) from a class with __slots__ and no __getstate__.
            first, second = state
            state = {**(first or {}), **(second or {})}
        self.fields.update(state)


_STAND_INS: dict[str, type[_Recorded]] = {}


def _stand_in(path: str) -> type[_Recorded]:
    cls = _STAND_INS.get(path)
    if cls is None:
        cls = type(f"Recorded[{path}]", (_Recorded,), {"path": path})
        _STAND_INS[path] = cls
    return cls


class _V2Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        path = f"{module}.{name}"
        if path in V2_STATE_TYPES or path in _V2_OTHERS:
            return _stand_in(path)
        if not allowed_global(module, name):
            raise SnapshotError(f"refers to {path}, which a snapshot may not hold")
        return checked_global(module, name, super().find_class(module, name))


# -- older shapes brought to today's, by state type ------------------------------------

_INF = math.inf


def _field(obj: Any, name: str) -> Any:
    return obj.fields[name] if isinstance(obj, _Recorded) else getattr(obj, name)


def tracker_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A call tracker's fields as written by any release, in today's shape."""
    if "_due" not in fields:
        # Before the float heap: (deadline, call_id) entries.
        due: dict[float, str | list[str]] = {}
        for deadline, call_id in fields["deadlines"]:
            earlier = due.get(deadline)
            if earlier is None:
                due[deadline] = call_id
            elif isinstance(earlier, str):
                due[deadline] = [earlier, call_id]
            else:
                earlier.append(call_id)
        fields = {**fields, "deadlines": sorted(due), "_due": due}
    if type(fields["_finished"]) is OrderedDict:
        # Before the plain dict: the same ids in the same order.
        fields = {**fields, "_finished": dict(fields["_finished"])}
    if "_in_order" not in fields:
        # Before the queues every deadline was in the heap, and some releases had
        # queues of bare deadlines (their calls in `_due`): those join the heap.
        heap = list(fields["deadlines"])
        for queue in fields.get("_queues", ()):
            for deadline in _field(queue, "items")[_field(queue, "head") :]:
                heapq.heappush(heap, deadline)
        empty = [revive("deadline-queue", {"items": [], "head": 0}) for _ in range(3)]
        fields = {k: v for k, v in fields.items() if k != "_queues"}
        fields.update(deadlines=heap, _in_order=empty, next_due=heap[0] if heap else _INF)
    return fields


# A menu's call as v2 and v3 kept it, a tuple: ts, call id, caller bucket, answered,
# short, ring seconds, log of talk seconds, forwarded. Today: columns, flags as bits.
_ANSWERED, _SHORT, _FORWARDED, _RANG, _TALKED = 1, 2, 4, 8, 16
_EVIDENCE = 200


def _call_window(calls: Any) -> Any:
    columns: dict[str, Any] = {
        "ts": array("d"),
        "bucket": array("H"),
        "flags": array("B"),
        "ring": array("d"),
        "talk": array("d"),
        "head": 0,
    }
    for ts, _, bucket, answered, short, ring_s, talk_log, forwarded in calls:
        columns["ts"].append(ts)
        columns["bucket"].append(bucket)
        columns["flags"].append(
            (_ANSWERED if answered else 0)
            | (_SHORT if short else 0)
            | (_FORWARDED if forwarded else 0)
            | (_RANG if ring_s is not None else 0)
            | (_TALKED if talk_log is not None else 0)
        )
        columns["ring"].append(ring_s or 0.0)
        columns["talk"].append(talk_log or 0.0)
    return revive("model.call-window", columns)


def _menu_traffic_v3(fields: dict[str, Any]) -> dict[str, Any]:
    pending, live = fields["pending"], fields["live"]
    fields["pending"] = _call_window(pending)
    fields["pending_ids"] = deque(call[1] for call in pending)
    fields["live"] = _call_window(live)
    fields["newest_ids"] = deque((call[1] for call in live), maxlen=_EVIDENCE)
    return fields


def _menu_traffic(fields: dict[str, Any]) -> dict[str, Any]:
    for name in ("pending", "live"):
        calls = fields[name]
        if calls and isinstance(calls[0], _Recorded):
            # Before plain tuples: each call an object of its own (models.menu._Seen).
            fields[name] = deque(
                tuple(
                    seen.fields[key]
                    for key in (
                        "ts",
                        "call_id",
                        "bucket",
                        "answered",
                        "short",
                        "ring_s",
                        "talk_log",
                        "forwarded",
                    )
                )
                for seen in calls
            )
    return _menu_traffic_v3(fields)


# A caller's state in v2: one array('d') read by these offsets (calls, the latest's
# deadline, its callee's checksum, the first's deadline, the flags' histories as one
# number, the recent means of ring and talk, the own-history rate of each flag
# (short, unanswered, forwarded, callee changed) and of ring and talk).
_V2_CALLER_STATE = (
    ("calls", int),
    ("last_ts", float),
    ("last_callee", int),
    ("first_ts", float),
    ("histories", int),
    ("ring", float),
    ("talk", float),
    ("own_short", float),
    ("own_unanswered", float),
    ("own_forward", float),
    ("own_change", float),
    ("own_ring", float),
    ("own_talk", float),
)


def _anomaly(river: Any) -> Any:
    """An anomaly model as v2 and v3 wrote it (a River pipeline, scaler then
    HalfSpaceTrees) as today's `model.anomaly`, its River part already made."""
    trees = list(river.steps.values())[-1]
    return revive(
        "model.anomaly",
        {
            "trees": (trees.n_trees, trees.height, trees.window_size, trees.seed),
            "river": river,
            "pending": [],
        },
    )


def _menu_state(fields: dict[str, Any]) -> dict[str, Any]:
    fields["model"] = _anomaly(fields["model"])
    return fields


def _caller_model(fields: dict[str, Any]) -> dict[str, Any]:
    # The spec comes from the model's file on restore, and what is derived from it is
    # derived again then (models/state_types.py).
    fields.pop("spec", None)
    for name in ("alone_mask", "lane_bits"):
        fields.pop(name, None)
    fields["population"] = _anomaly(fields["population"])
    keyed = fields["state"]
    for caller, state in list(keyed.states.items()):
        if type(state) is array:
            keyed.states[caller] = revive(
                "model.caller-state",
                {
                    name: kind(value)
                    for (name, kind), value in zip(_V2_CALLER_STATE, state, strict=True)
                },
            )
    return fields


def _menu_model(fields: dict[str, Any]) -> dict[str, Any]:
    fields.pop("spec", None)
    return fields


_SHAPES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "call-tracker": tracker_fields,
    "model.menu-traffic": _menu_traffic,
    "model.menu-state": _menu_state,
    "model.caller": _caller_model,
    "model.menu": _menu_model,
}


def _caller_model_v3(fields: dict[str, Any]) -> dict[str, Any]:
    fields["population"] = _anomaly(fields["population"])
    return fields


_V3_SHAPES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "model.menu-traffic": _menu_traffic_v3,
    "model.menu-state": _menu_state,
    "model.caller": _caller_model_v3,
}


def _revive_v3(name: str, fields: dict[str, Any]) -> Any:
    shape = _V3_SHAPES.get(name)
    return revive(name, shape(fields) if shape is not None else fields)


class _V3Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not allowed_global(module, name):
            raise SnapshotError(f"refers to {module}.{name}, which a snapshot may not hold")
        found = checked_global(module, name, super().find_class(module, name))
        return _revive_v3 if found is revive else found


def _fields_of(recorded: _Recorded) -> dict[str, Any]:
    if recorded.path == "engine.detect.calls.Call":
        # Made with (call_id, caller, callee, forward, menu_id, menu_name, started_at).
        return {"made_with": recorded.args, **recorded.fields}
    return dict(recorded.fields)


class _Converter:
    """Today's objects for a tree of v2 stand-ins (each converted once, shared as before)."""

    def __init__(self) -> None:
        self.done: dict[int, Any] = {}

    def convert(self, value: Any) -> Any:
        kind = type(value)
        if kind in (str, float, int, bool, bytes, type(None), array):
            return value
        key = id(value)
        if key in self.done:
            return self.done[key]
        if isinstance(value, _Recorded):
            return self._object(value)
        if kind is dict or kind is OrderedDict:
            converted_dict: dict[Any, Any] = kind()
            self.done[key] = converted_dict
            for k, v in value.items():
                converted_dict[self.convert(k)] = self.convert(v)
            return converted_dict
        if kind is list:
            converted_list: list[Any] = []
            self.done[key] = converted_list
            converted_list.extend(self.convert(v) for v in value)
            return converted_list
        if kind is tuple:
            converted_tuple = tuple(self.convert(v) for v in value)
            self.done[key] = converted_tuple
            return converted_tuple
        if kind is deque:
            converted_deque: deque[Any] = deque(maxlen=value.maxlen)
            self.done[key] = converted_deque
            converted_deque.extend(self.convert(v) for v in value)
            return converted_deque
        if kind is set or kind is frozenset:
            return kind(self.convert(v) for v in value)
        return value  # River's objects and other allowed types: as they loaded

    def _object(self, recorded: _Recorded) -> Any:
        name = V2_STATE_TYPES.get(recorded.path)
        if name is None:
            # Kept as a stand-in: only its owner reads it (a _Seen in a menu's traffic).
            return recorded
        fields = {k: self.convert(v) for k, v in _fields_of(recorded).items()}
        shape = _SHAPES.get(name)
        if shape is not None:
            fields = shape(fields)
        obj = revive(name, fields)
        self.done[id(recorded)] = obj
        return obj


def migrate(version: str, payload: bytes) -> Snapshot:
    """Today's snapshot from the payload of an earlier format `version` (e.g. "v2")."""
    if version not in ("v2", "v3"):
        raise SnapshotError(
            f"written by another version of callsentry (snapshot {version}; this one "
            f"reads v2, v3 and v4)"
        )
    reader = _V2Unpickler if version == "v2" else _V3Unpickler
    try:
        document = reader(io.BytesIO(payload)).load()
    except SnapshotError:
        raise
    except Exception as error:  # a damaged payload can fail in almost any way
        raise SnapshotError(
            f"cannot be read as {version} ({type(error).__name__}: {error})"
        ) from None
    if version == "v3":
        return snapshot_of(document, 3)
    if not isinstance(document, _Recorded) or document.path != "engine.detect.snapshot.Snapshot":
        raise SnapshotError("holds no v2 snapshot")
    position = document.fields["position"].fields
    state = _Converter().convert(document.fields["state"])
    return Snapshot(
        Position(int(position["segment"]), int(position["seq"])),
        state,
        float(document.fields["taken_at"]),
    )
