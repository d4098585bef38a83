"""The compiled parts: the detection's hot path compiled by mypyc and the C helpers of
ingest, each in use where built, never used when its source has changed since; the
detection pickled into snapshots the same way either way, and giving the same calls
and alerts compiled and as Python."""

from __future__ import annotations

import gc
import importlib.machinery
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

import engine.detect
from engine.core.events import CallEvent, CallState
from engine.core.positions import Position
from engine.core.runtime import collector_held_off
from engine.detect import (
    COMPILED,
    RECORD,
    aggregates,
    calls,
    compiled_modules,
    module_name,
    stale_reason,
    windows,
)
from engine.detect.conduct import Conduct, ConductLedger
from engine.detect.migrations import tracker_fields
from engine.detect.snapshot import decode, encode
from engine.detect.state import STATE_TYPES, Snapshot, SnapshotError, revive
from engine.ingest import native
from models.caller_state import CallerState
from tests.test_conduct import finished

DETECT = Path(engine.detect.__file__).parent
ROOT = DETECT.parent.parent


def test_detection_is_compiled_and_in_use_on_linux() -> None:
    # Optional at install time (a machine without a compiler runs it as Python); on
    # the machines `make setup` builds for it must be there, or detection quietly
    # runs at half its speed.
    if not sys.platform.startswith("linux"):
        pytest.skip("compiled on Linux")
    if os.environ.get("CALLSENTRY_DETECTION_AS_PYTHON", "") not in ("", "0"):
        pytest.skip("detection asked to run as Python")
    assert compiled_modules() == list(COMPILED), "make setup compiles engine.detect.COMPILED"
    assert stale_reason() is None
    for source in COMPILED:
        module = importlib.import_module(module_name(source))
        assert module.__file__ is not None
        assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), source


def _copy_of_compiled_sources(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for source in COMPILED:
        (root / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / source, root / source)
    return root


def test_a_source_changed_since_compiling_is_run_as_python(tmp_path: Path) -> None:
    root = _copy_of_compiled_sources(tmp_path)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for source in COMPILED:
        (root / source).with_suffix(suffix).touch()  # stands for a compiled module
    (root / RECORD).write_text(
        "".join(f"{engine.detect.source_digest(root / s)}  {s}\n" for s in COMPILED)
    )
    assert stale_reason(root) is None
    with (root / "models" / "caller_state.py").open("a") as source:
        source.write("\n# an edit\n")
    assert stale_reason(root) == "models/caller_state.py changed since compiled"
    (root / RECORD).unlink()
    assert stale_reason(root) == f"no readable record of what was compiled ({RECORD})"
    (root / "engine" / "detect" / "pipeline.py").with_suffix(suffix).unlink()
    assert stale_reason(root) == "only some are compiled (engine/detect/pipeline.py is not)"
    for source in COMPILED:
        (root / source).with_suffix(suffix).unlink(missing_ok=True)
    assert stale_reason(root) is None, "nothing compiled: the sources run, nothing to say"


def test_stale_compiled_modules_are_passed_over_for_their_sources(tmp_path: Path) -> None:
    # A package whose compiled files are stale imports its .py sources instead, and says
    # why in the log.
    root = tmp_path / "root"
    shutil.copytree(DETECT.parent.parent / "engine", root / "engine", symlinks=False)
    shutil.copytree(DETECT.parent.parent / "models", root / "models")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for source in COMPILED:
        (root / source).with_suffix(suffix).write_bytes(b"not a module")  # would fail to load
    (root / RECORD).unlink(missing_ok=True)
    # The models' compiled module first: its package must put the finder in place.
    probe = (
        "import models.caller_state as m, engine.detect.pipeline as p, engine.detect.calls as c; "
        "print(m.__file__.endswith('.py'), p.__file__.endswith('.py'), "
        "c.__file__.endswith('.py'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "CALLSENTRY_DETECTION_AS_PYTHON"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True, env=env
    )
    assert done.stdout.split() == ["True", "True", "True"]
    assert "compiled detection not used: no readable record" in done.stderr


def _report(ts: float, call_id: str, serial: int, state: CallState) -> CallEvent:
    return CallEvent(ts, call_id, serial, state, 180, "100", "200", "", "7", "M", "t")


def test_detection_state_survives_pickling_whole() -> None:
    tracker = calls.CallTracker(settle_s=3.0, max_open_calls=5_000)
    tracker.observe(_report(1.0, "a", 1, CallState.RINGING))
    tracker.observe(_report(2.0, "a", 2, CallState.ANSWERED))
    tracker.observe(_report(2.5, "b", 1, CallState.RINGING))
    tracker.observe(_report(9.0, "b", 2, CallState.HANGUP))
    tracker.advance(20.0)
    keyed: windows.KeyedState[windows.Entries] = windows.KeyedState(10)
    states: list[windows.Entries] = [
        windows.CountState(),
        windows.ValueState(),
        aggregates.SpikeState(30.0, 0.3),
        aggregates.FirstSeenState(5.0),
        aggregates.SequentialState(),
        aggregates.ShareState(),
        windows.Entries(),
        windows.ValueEntries(),
    ]
    for index, state in enumerate(states):
        state.add(1.0 + index, f"c{index}", 2.5)
        state.add(40.0 + index, f"d{index}", 2.5)
        state.leave_until(11.0 + index)
        keyed.put(f"k{index}", state)
    copy = pickle.loads(pickle.dumps((tracker, keyed), protocol=pickle.HIGHEST_PROTOCOL))
    restored_tracker, restored_keyed = copy
    assert restored_tracker.__getstate__().keys() == tracker.__getstate__().keys()
    assert restored_tracker.open == tracker.open and restored_tracker.now == tracker.now
    assert restored_tracker.deadlines == tracker.deadlines
    assert restored_tracker.stats == tracker.stats
    assert restored_tracker.settle_s == 3.0 and restored_tracker.max_open_calls == 5_000
    for key, state in keyed.states.items():
        again = restored_keyed.states[key]
        assert type(again) is type(state) and again.__getstate__().keys() == (
            state.__getstate__().keys()
        )
        assert again.live_call_ids() == state.live_call_ids() and len(again) == len(state)
    spike = restored_keyed.states["k2"]
    assert isinstance(spike, aggregates.SpikeState) and spike.baseline.alpha == 0.3


@pytest.mark.parametrize(
    "kind",
    [
        windows.Entries,
        windows.ValueEntries,
        windows.EwBaseline,
        windows.Folded,
        windows.Bucket,
        windows.CountState,
        windows.ValueState,
        aggregates.SpikeState,
        aggregates.FirstSeenState,
        aggregates.SequentialState,
        aggregates.ShareState,
        CallerState,
    ],
)
def test_what_a_snapshot_keeps_is_every_attribute(kind: type[windows.Snapshotted]) -> None:
    # A slot added without adding it to state_fields would be lost in every snapshot.
    slots = {name for klass in kind.__mro__ for name in getattr(klass, "__slots__", ())}
    attributes = set(getattr(kind, "__mypyc_attrs__", ())) - {"__dict__", "__weakref__"}
    assert set(kind().state_fields()) == (attributes or slots)


def _snapshotted_types() -> list[type[windows.Snapshotted]]:
    import models.state_types  # noqa: F401  (registers the models' state types)

    return sorted(
        {entry.cls for entry in STATE_TYPES.values() if entry.snapshotted},
        key=lambda kind: kind.__qualname__,
    )


@pytest.mark.parametrize("kind", _snapshotted_types(), ids=lambda kind: kind.__qualname__)
def test_a_row_holds_every_field_in_the_order_of_state_fields(
    kind: type[windows.Snapshotted],
) -> None:
    # A snapshot writes many objects of one class as rows (engine.detect.state); a class
    # that reads its fields directly (a caller's conduct, a caller's model state) must
    # give them in `state_fields`' order, each number told apart from the others here.
    made = kind()
    for index, name in enumerate(made.state_fields()):
        value = getattr(made, name)
        if type(value) is int:
            setattr(made, name, 1_000 + index)
        elif type(value) is float:
            setattr(made, name, 0.5 + index)
    fields = made.__getstate__()
    row = made.state_row()
    assert row == tuple(fields[name] for name in made.state_fields())
    again = kind()
    again.set_row(row)
    assert again.__getstate__() == fields


def test_many_objects_of_one_class_are_written_as_rows_and_read_back_in_order() -> None:
    ledger = ConductLedger(4)
    for number, talk in (("900", 9.0), ("800", 9.0), ("300", 2.0), ("100", 40.0), ("200", -1.0)):
        ledger.observe(finished(number, 1.0, answered=talk >= 0.0, talk=max(talk, 0.0)))
    assert ledger.callers.evicted == 2  # "900" and "800", the least recently seen
    mixed: windows.KeyedState[windows.Entries] = windows.KeyedState(10)
    mixed.put("a", windows.CountState())
    mixed.put("b", windows.ValueState())
    payload = encode(Snapshot(Position(1, 1), {"conduct": ledger.callers, "mixed": mixed}, 0.0))
    assert payload.count(b"keyed-rows") == 1
    state = decode(payload).state
    restored = state["conduct"]
    assert list(restored.states) == list(ledger.callers.states) == ["300", "100", "200"]
    assert restored.max_keys == 4 and restored.evicted == 2
    for number, conduct in ledger.callers.states.items():
        assert restored.states[number].__getstate__() == conduct.__getstate__()
    assert [type(value) for value in state["mixed"].states.values()] == [
        windows.CountState,
        windows.ValueState,
    ]


def test_rows_written_with_other_fields_are_read_by_name_and_damaged_ones_refused() -> None:
    conduct = Conduct()
    conduct.learn(True, 4.0, 2.0, 10.0)
    names = list(reversed(conduct.state_fields()))
    row = [conduct.__getstate__()[name] for name in names]
    fields = {"max_keys": 5, "evicted": 0, "values": "caller-conduct", "fields": names}
    keyed = revive("keyed-rows", {**fields, "keys": ["100"], "rows": row})
    assert keyed.states["100"].__getstate__() == conduct.__getstate__()
    with pytest.raises(SnapshotError, match="do not match their fields and keys"):
        revive("keyed-rows", {**fields, "keys": ["100", "200"], "rows": row})
    with pytest.raises(SnapshotError, match="not a snapshotted type"):
        revive("keyed-rows", {**fields, "values": "call", "keys": [], "rows": []})


class _Crafted:
    """Pickles as the `keyed-rows` revive call with `fields`, whatever they are."""

    def __init__(self, fields: object) -> None:
        self.fields = fields

    def __reduce__(self) -> tuple[object, tuple[str, object]]:
        return revive, ("keyed-rows", self.fields)


_ROW_OK = {"max_keys": 5, "evicted": 0, "values": "caller-conduct", "keys": ["1"]}


@pytest.mark.parametrize(
    "fields",
    [
        {**_ROW_OK, "fields": Conduct().state_fields(), "rows": {"a": 1}},
        {**_ROW_OK, "fields": None, "rows": []},
        {**_ROW_OK, "fields": Conduct().state_fields(), "rows": ["x"] * 16},
        {**_ROW_OK, "fields": ("calls",), "rows": ["not a number"]},
        {**_ROW_OK, "fields": ("__class__",), "rows": [dict]},
        {**_ROW_OK, "keys": [["unhashable"]], "fields": (), "rows": []},
        {**_ROW_OK, "values": "no-such-type", "fields": (), "rows": []},
        {**_ROW_OK, "values": "keyed-rows", "fields": (), "rows": []},
        {"rows": []},
        ["not", "a", "mapping"],
    ],
    ids=lambda fields: str(fields)[-40:],
)
def test_crafted_rows_are_refused_as_a_damaged_snapshot(fields: object) -> None:
    payload = encode(Snapshot(Position(1, 1), {"crafted": _Crafted(fields)}, 0.0))
    try:
        restored = decode(payload).state["crafted"]
    except SnapshotError:
        return
    # As Python a field takes whatever it is given, as the dict form's always did; what
    # is read is still only plain data on an object of a state type.
    assert os.environ.get("CALLSENTRY_DETECTION_AS_PYTHON") == "1" or not compiled_modules()
    assert isinstance(restored, windows.KeyedState)


def test_the_collector_is_held_off_while_a_snapshot_is_made_and_on_again_after_a_failure() -> None:
    seen: list[bool] = []

    class Probe:  # pickled by its own reduce (not ours: no state type needed)
        def __reduce_ex__(self, protocol: object) -> tuple[type, tuple[str]]:
            seen.append(gc.isenabled())
            return float, ("1.5",)

    class Unnamed:  # a class of ours with no state type
        __module__ = "engine.detect.example"

    assert gc.isenabled()
    assert decode(encode(Snapshot(Position(1, 1), {"probe": Probe()}, 0.0))).state == {"probe": 1.5}
    assert seen == [False] and gc.isenabled()
    with pytest.raises(SnapshotError, match="has no state type"):
        encode(Snapshot(Position(1, 1), {"unnamed": Unnamed()}, 0.0))
    assert gc.isenabled()
    with pytest.raises(SnapshotError):
        decode(b"not a payload")
    assert gc.isenabled()


def test_the_collector_stays_off_until_the_last_of_two_overlapping_holds_leaves() -> None:
    # Two threads writing snapshots at once: the first to finish must not turn the
    # collector on under the other.
    first, second = collector_held_off(), collector_held_off()
    assert gc.isenabled()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()
    # Off before the first hold: off after the last.
    gc.disable()
    try:
        with collector_held_off(), collector_held_off():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


_PICKLE_STATE = """
import pickle, sys
from engine.detect import aggregates, calls, windows
from engine.core.events import CallEvent, CallState
from models.caller_state import CallerState
import models.state_types
from engine.core.positions import Position
from engine.detect.snapshot import decode, encode
from engine.detect.state import Snapshot
if sys.argv[1] == "write":
    tracker = calls.CallTracker(settle_s=4.0)
    tracker.observe(CallEvent(1.0, "a", 1, CallState.RINGING, 183, "1", "2", "", "7", "M", ""))
    tracker.observe(CallEvent(2.0, "a", 2, CallState.ANSWERED, None, "1", "2", "", "7", "M", ""))
    keyed = windows.KeyedState(4)
    spike = aggregates.SpikeState(30.0, 0.4)
    spike.add(1.0, "a", None)
    spike.baseline.observe(1.0)
    keyed.put("1", spike)
    caller = CallerState(5.0, 1.0, 2.0)
    caller.learn(3, 8193, 0, 4.0, 1.5, 0.5, 77, 9.0)
    open(sys.argv[2], "wb").write(pickle.dumps((tracker, keyed, caller)))
    callers = windows.KeyedState(4)  # written as rows
    callers.put("9", CallerState())
    callers.put("8", caller)
    snapshot = encode(Snapshot(Position(1, 1), {"callers": callers}, 0.0))
    assert b"keyed-rows" in snapshot
    open(sys.argv[2] + ".snapshot", "wb").write(snapshot)
tracker, keyed, caller = pickle.loads(open(sys.argv[2], "rb").read())
rows = decode(open(sys.argv[2] + ".snapshot", "rb").read()).state["callers"]
print(calls.__file__.endswith(".py"), tracker.open["a"].answered_at, tracker.settle_s,
      keyed.states["1"].baseline.alpha, keyed.states["1"].live_call_ids(),
      caller.calls, caller.histories, caller.ring, caller.own_unanswered, caller.last_callee,
      "".join(rows.states), rows.states["8"].histories, rows.states["8"].own_unanswered)
"""


@pytest.mark.parametrize("writer_as_python", [True, False])
def test_compiled_and_python_builds_read_each_others_snapshots(
    writer_as_python: bool, tmp_path: Path
) -> None:
    if compiled_modules() != list(COMPILED) or stale_reason() is not None:
        pytest.skip("needs a compiled build of these sources (make setup)")
    path = tmp_path / "state.pickle"

    def run(step: str, as_python: bool) -> list[str]:
        env = {**os.environ, "CALLSENTRY_DETECTION_AS_PYTHON": "1" if as_python else "0"}
        done = subprocess.run(
            [sys.executable, "-c", _PICKLE_STATE, step, str(path)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        return done.stdout.split()

    written = run("write", writer_as_python)
    read = run("read", not writer_as_python)
    assert written[0] == str(writer_as_python) and read[0] == str(not writer_as_python)
    assert (
        written[1:]
        == read[1:]
        == ["2.0", "4.0", "0.4", "['a']", "1", "8193", "2.5", "0.02", "77", "98", "8193", "0.02"]
    )


def _pending(state: dict[str, Any]) -> list[tuple[float, str]]:
    """A tracker state's deadline entries, wherever it keeps them, as (deadline, call_id)."""
    pairs = [
        (deadline, call_id)
        for deadline, ids in state["_due"].items()
        for call_id in ([ids] if isinstance(ids, str) else ids)
    ]
    for queue in state["_in_order"]:
        live = queue.items[queue.head :]
        pairs += zip(live[::2], live[1::2], strict=True)
    return sorted(pairs)


def _fed() -> calls.CallTracker:
    tracker = calls.CallTracker(settle_s=3.0, ring_timeout_s=30.0)
    tracker.observe(_report(1.0, "a", 1, CallState.RINGING))
    tracker.observe(_report(2.0, "a", 2, CallState.ANSWERED))
    tracker.observe(_report(2.5, "b", 1, CallState.RINGING))
    tracker.observe(_report(3.0, "c", 1, CallState.RINGING))
    tracker.observe(_report(9.0, "b", 2, CallState.HANGUP))
    tracker.observe(_report(9.0, "d", 1, CallState.RINGING))
    tracker.observe(_report(9.0, "d", 2, CallState.HANGUP))
    return tracker


def _carries_on_as_fed(state: dict[str, Any]) -> None:
    restored = calls.CallTracker()
    restored.__setstate__(tracker_fields(state))
    tracker = _fed()
    for now in (10.0, 12.5, 40.0, 20_000.0):
        restored.observe(_report(now, f"n{now}", 1, CallState.RINGING))
        tracker.observe(_report(now, f"n{now}", 1, CallState.RINGING))
        finished = [(c.call_id, c.outcome) for c in tracker.advance(now)]
        assert [(c.call_id, c.outcome) for c in restored.advance(now)] == finished
    assert list(restored.open) == list(tracker.open) == ["n20000.0"]
    for late in (restored, tracker):
        assert late.observe(_report(20_001.0, "b", 3, CallState.HANGUP)) is None
    assert restored.stats == tracker.stats and tracker.stats.late_reports == 1
    assert type(restored._finished) is dict and restored._finished == tracker._finished


def test_a_tracker_saved_with_its_deadlines_as_tuples_carries_on() -> None:
    # Snapshots taken before the heap held floats keep (deadline, call_id) pairs, and
    # the finished call ids in an OrderedDict (and no in-order queues: every deadline
    # in the heap); such a tracker, restored, finishes the same calls at the same
    # moments and knows the same late reports.
    state = _fed().__getstate__()
    assert state["_in_order"][0].items, "most deadlines are queued in order"
    state["deadlines"] = _pending(state)
    del state["_due"], state["_in_order"], state["next_due"]
    state["_finished"] = OrderedDict(state["_finished"])
    _carries_on_as_fed(state)


def test_a_tracker_saved_with_queues_of_bare_deadlines_carries_on() -> None:
    # For a while the in-order queues held deadlines alone, their calls in `_due`.
    state = _fed().__getstate__()
    pending = _pending(state)
    queues = [calls.DeadlineQueue(), calls.DeadlineQueue(), calls.DeadlineQueue()]
    due: dict[float, list[str]] = {}
    for deadline, call_id in pending:
        due.setdefault(deadline, []).append(call_id)
    for n, deadline in enumerate(sorted(due)):
        queues[n % 3].items.append(deadline)
    del state["_in_order"]
    state.update(_queues=queues, _due=due, deadlines=[], next_due=pending[0][0])
    _carries_on_as_fed(state)


def test_finished_call_ids_are_remembered_up_to_the_bound() -> None:
    tracker = calls.CallTracker(settle_s=1.0, remember_finished=32)
    for n in range(100):
        tracker.observe(_report(float(n), f"c{n:03d}", 1, CallState.HANGUP))
    tracker.advance(200.0)
    # At most a sixteenth over the bound, the newest kept in the order they finished.
    assert 32 <= len(tracker._finished) <= 34
    assert list(tracker._finished)[-32:] == [f"c{n:03d}" for n in range(68, 100)]
    assert tracker.observe(_report(201.0, "c099", 2, CallState.HANGUP)) is None
    assert tracker.stats.late_reports == 1
    # A call forgotten long ago is a new call again.
    assert tracker.observe(_report(201.0, "c000", 2, CallState.HANGUP)) is not None


def test_calls_due_at_the_same_moment_finish_in_call_id_order() -> None:
    tracker = calls.CallTracker(settle_s=3.0)
    for call_id in ("z", "b", "m"):
        tracker.observe(_report(1.0, call_id, 1, CallState.RINGING))
        tracker.observe(_report(5.0, call_id, 2, CallState.HANGUP))
    tracker.observe(_report(4.0, "a", 1, CallState.HANGUP))  # due at 7.0, sooner
    assert [c.call_id for c in tracker.advance(8.0)] == ["a", "b", "m", "z"]


# Runs detection over pickled events with the shipped rules and models, as a fresh
# process does (the compiled-or-Python choice is made when engine.detect is imported),
# and writes every call finished and every alert raised, one JSON line each.
_DETECT_EVENTS = """
import dataclasses, json, pickle, sys
import engine.detect
from engine.apps.detectors import make_pipeline
from engine.apps.settings import DetectionSettings

modules = [
    __import__(engine.detect.module_name(s), fromlist=["_"]) for s in engine.detect.COMPILED
]
print(json.dumps([m.__file__ for m in modules]))
for events_path in sys.argv[1:]:
    with open(events_path, "rb") as file:
        events = pickle.load(file)
    pipeline = make_pipeline(DetectionSettings())
    lines = []
    def keep(output):
        lines.extend(json.dumps(["call", c.__getstate__()]) for c in output.calls)
        lines.extend(json.dumps(["alert", dataclasses.asdict(a)]) for a in output.alerts)
    for start in range(0, len(events), 4096):  # in batches, as the lake writer feeds it
        keep(pipeline.feed(events[start : start + 4096]))
    keep(pipeline.advance(events[-1].ts + 86_400.0))  # every call finished
    with open(events_path + ".out", "w") as file:
        file.write("\\n".join(lines))
"""

# Each scenario as written and with another seed (other callers, other timings): about
# 140,000 reports, some 10 s a process on a 2-core machine with both running at once.
_SEEDS_ADDED = 1_000


def test_every_scenario_gives_the_same_calls_and_alerts_compiled_and_as_python(
    tmp_path: Path,
) -> None:
    # CI always compiles: a missing or stale build fails here rather than comparing
    # Python with Python.
    if not sys.platform.startswith("linux"):
        pytest.skip("compiled on Linux")
    from engine.simulator.scenario import generate, load_scenario

    scenarios = sorted((DETECT.parent.parent / "data" / "scenarios").glob("*.yaml"))
    assert len(scenarios) >= 5, scenarios
    paths = []
    for path in scenarios:
        scenario = load_scenario(path)
        for seed in (scenario.seed, scenario.seed + _SEEDS_ADDED):
            events = generate(scenario.model_copy(update={"seed": seed})).events
            paths.append(tmp_path / f"{path.stem}-{seed}.pickle")
            paths[-1].write_bytes(pickle.dumps(events, protocol=pickle.HIGHEST_PROTOCOL))

    def start(as_python: bool, folder: str) -> subprocess.Popen[str]:
        env = {**os.environ, "CALLSENTRY_DETECTION_AS_PYTHON": "1" if as_python else "0"}
        (tmp_path / folder).mkdir()
        copies = [shutil.copy(p, tmp_path / folder / p.name) for p in paths]
        return subprocess.Popen(
            [sys.executable, "-c", _DETECT_EVENTS, *map(str, copies)],
            cwd=DETECT.parent.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # Both at once: one core each.
    runs = {"compiled": start(False, "compiled"), "python": start(True, "python")}
    files = {}
    for name, run in runs.items():
        stdout, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr
        assert "compiled detection not used" not in stderr, stderr
        files[name] = [Path(f) for f in json.loads(stdout.splitlines()[0])]
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert all(f.name.endswith(suffixes) for f in files["compiled"]), (
        f"make setup compiles engine/detect: {files['compiled']}"
    )
    assert all(f.suffix == ".py" for f in files["python"]), files["python"]

    detectors = set()
    for path in paths:
        compiled = (tmp_path / "compiled" / f"{path.name}.out").read_text().splitlines()
        python = (tmp_path / "python" / f"{path.name}.out").read_text().splitlines()
        assert len(compiled) == len(python), path.stem
        # In order, field by field (ids, times, values, evidence), as JSON text: floats
        # written shortest-exact, so any difference in a last bit shows.
        for line_compiled, line_python in zip(compiled, python, strict=True):
            assert line_compiled == line_python, path.stem
        records = [json.loads(line) for line in compiled]
        assert any(kind == "call" for kind, _ in records), path.stem
        detectors |= {fields["detector"] for kind, fields in records if kind == "alert"}
    assert detectors == {"rule", "model"}, "what is compared has alerts of both kinds"


def test_the_c_helpers_are_built_and_in_use_on_linux() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("built on Linux")
    for name in native.HELPERS:
        assert native.stale_reason(name) is None, "make setup builds engine/ingest/*.c"
        module = native.load(name)
        assert module is not None and module.__file__ is not None, name
        assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


_LOAD_HELPERS = """
import json
from engine.ingest import native
from engine.ingest.eventfiles import _take_rows
from engine.ingest.intake import SeenReports
from engine.ingest.journal import durable_write
loaded = {name: native.load(name) is not None for name in native.HELPERS}
in_use = {
    "_fastio": durable_write is not None,
    "_seen": type(SeenReports(60).keys).__name__ == "KeyTable",
    "_rows": _take_rows is not None,
}
assert in_use == loaded, (in_use, loaded)  # every import site goes through the loader
print(native.__file__)
print(json.dumps(loaded))
"""


def test_a_c_helper_whose_source_changed_since_its_build_is_not_loaded(tmp_path: Path) -> None:
    # A copy of the package with its builds: as built, every helper loads; with a
    # source edited (or its record), that helper's Python equivalent runs and one
    # warning names the file and says what to run.
    if not sys.platform.startswith("linux"):
        pytest.skip("built on Linux")
    root = tmp_path / "root"
    shutil.copytree(
        DETECT.parent.parent / "engine",
        root / "engine",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(DETECT.parent.parent / "models", root / "models")
    ingest = root / "engine" / "ingest"

    def load() -> tuple[dict[str, bool], str]:
        env = {k: v for k, v in os.environ.items() if k != "CALLSENTRY_DETECTION_AS_PYTHON"}
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_HELPERS],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        where, loaded = done.stdout.splitlines()
        assert Path(where).is_relative_to(root), where
        return json.loads(loaded), done.stderr

    loaded, said = load()
    assert loaded == dict.fromkeys(native.HELPERS, True), said
    assert "C helper" not in said

    with (ingest / "_seen.c").open("a") as source:
        source.write("/* an edit */\n")
    record = (ingest / native.RECORD).read_text()
    digest = native.recorded_digests(ingest)["_rows.c"]
    (ingest / native.RECORD).write_text(record.replace(digest, "0" * 64))
    loaded, said = load()
    assert loaded == {"_fastio": True, "_seen": False, "_rows": False}
    for name in ("_seen", "_rows"):
        warning = f"C helper {name} not used: {name}.c changed since it was built"
        assert said.count(warning) == 1, said
    assert said.count("`make setup` builds it again") == 2

    (ingest / native.RECORD).unlink()
    loaded, said = load()
    assert loaded == dict.fromkeys(native.HELPERS, False)
    assert f"C helper _fastio not used: no record ({native.RECORD}) of building _fastio.c" in said
