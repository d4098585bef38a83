"""Every registered aggregate through the same checks (engine/detect/aggregates.py):
window boundaries, eviction of idle and surplus entities, snapshot round trips, and
the comparisons a condition makes."""

from __future__ import annotations

import pickle
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.events import CallEvent, CallState
from engine.core.positions import Position
from engine.detect.aggregates import (
    AGGREGATES,
    COMPARISONS,
    NEW_VALUE_MAX_SEEN,
    Aggregate,
    Concurrent,
)
from engine.detect.calls import Call, CallTracker
from engine.detect.evaluate import CompiledRule
from engine.detect.schema import Aggregate as AggregateSpec
from engine.detect.schema import RuleSpec
from engine.detect.snapshot import decode, encode
from engine.detect.state import Snapshot
from engine.detect.windows import FOLD_AT, EntityState

WINDOW = 60.0
T0 = 1_790_000_000.0
# What each type needs besides its type, entity and window.
SETTINGS: dict[str, dict[str, object]] = {
    "count": {},
    "distinct": {"field": "callee"},
    "sum": {"field": "talk_s"},
    "ratio": {"numerator": {"outcome": "answered"}},
    "baseline_spike": {"baseline_warmup": 1},
    "first_seen": {"new_for": 3600, "warmup": 0},
    "sequential": {},
    "concurrent": {},
    "new_value": {"field": "callee", "known_for": 0},
    # Every call a hit (all are through menu 1): the window is its hits.
    "unusual_share": {"numerator": {"menu_id": "1"}},
    "paced": {},
}
WINDOWED = [name for name, kind in AGGREGATES.items() if kind is not Concurrent]


def rule_for(
    kind: str, max_keys: int = 1000, op: str = ">=", window: float | None = WINDOW
) -> CompiledRule:
    concurrent = kind == "concurrent"
    spec = RuleSpec.model_validate(
        {
            "id": f"conformance-{kind}",
            "title": kind,
            "severity": "low",
            "on": "call_start" if concurrent else "call",
            "aggregate": {
                "type": kind,
                "group_by": "caller",
                **({} if window is None else {"window": window}),
                **SETTINGS[kind],
            },
            # Never met (a paced run of 30 at 2 s fits the window; of more, it could not).
            "condition": {"op": op, "threshold": 30 if kind == "paced" else 1_000_000},
        }
    )
    return CompiledRule(spec, {}, source="t", version="t", max_keys=max_keys)


def call_start_spec(aggregate: dict[str, object], rule_id: str = "converging") -> RuleSpec:
    """A rule on call starts with this aggregate, firing at 3."""
    return RuleSpec.model_validate(
        {
            "id": rule_id,
            "title": rule_id,
            "severity": "low",
            "on": "call_start",
            "aggregate": aggregate,
            "condition": {"op": ">=", "threshold": 3},
        }
    )


def a_call(n: int, ts: float, caller: str = "8613800000001", answered: bool = True) -> Call:
    # Callees step by one (a scan for `sequential`), every value of every field present.
    return Call(
        f"c{n}",
        caller,
        f"{4008001000 + n}",
        "",
        "1",
        "Main",
        ts - 20.0,
        ringing_at=ts - 20.0,
        ring_code=180,
        answered_at=ts - 15.0 if answered else None,
        ended_at=ts,
        outcome="answered" if answered else "abandoned",
        deadline=ts,
    )


def take(aggregate: Aggregate, state: EntityState, call: Call, ts: float) -> bool:
    """What a rule does with a call its selection takes (CompiledRule.evaluate)."""
    if not aggregate.add(state, call, ts):
        return False
    state.leave_until(ts - aggregate.window_s)
    return True


def test_every_type_the_schema_allows_is_registered_and_no_other() -> None:
    allowed = typing.get_args(AggregateSpec.model_fields["type"].annotation)
    assert set(AGGREGATES) == set(allowed) == set(SETTINGS)
    for name, kind in AGGREGATES.items():
        assert isinstance(rule_for(name).aggregate, kind)


# Gaps between calls: many at the same time, some exactly a window apart, most within.
_GAPS = st.lists(
    st.one_of(st.just(0.0), st.just(WINDOW), st.floats(min_value=0.0, max_value=2 * WINDOW)),
    min_size=1,
    max_size=40,
)


@pytest.mark.parametrize("kind", WINDOWED)
@settings(max_examples=60, deadline=None)
@given(gaps=_GAPS)
def test_the_window_holds_exactly_the_calls_of_the_last_window_length(
    kind: str, gaps: list[float]
) -> None:
    #   window 60 s, at t=130:  t=10 (out) ... t=70 (out: exactly 60 s old) ... 71, 130 (in)
    aggregate = rule_for(kind).aggregate
    aggregate.started_at = T0 - 10 * WINDOW
    ts = T0
    state = aggregate.new_state(ts)
    taken: list[tuple[float, str]] = []
    for n, gap in enumerate(gaps):
        ts += gap
        call = a_call(n, ts)
        counted = take(aggregate, state, call, ts)
        if kind == "new_value" and n >= NEW_VALUE_MAX_SEEN:
            # Each call brings a new callee; past the bound the entity is judged no
            # further (and, as any call not counted, leaves the window as it was).
            assert not counted, "an entity's values are bounded"
            continue
        assert counted, "every call carries what each type counts"
        taken.append((ts, call.call_id))
        live = [call_id for at, call_id in taken if ts - WINDOW < at <= ts]
        assert len(state) == len(live)
        assert state.live_call_ids() == live
        assert state.start() == min(at for at, _ in taken if ts - WINDOW < at)
        measured = aggregate.measure(state, call)
        assert measured is None or isinstance(measured, float)


@pytest.mark.parametrize("kind", WINDOWED)
def test_a_call_without_what_the_aggregate_counts_leaves_the_window_as_it_was(
    kind: str,
) -> None:
    aggregate = rule_for(kind).aggregate
    state = aggregate.new_state(T0)
    assert take(aggregate, state, a_call(1, T0), T0)
    unanswered = a_call(2, T0 + 1, answered=False)  # no talk time
    counted = take(aggregate, state, unanswered, T0 + 1)
    assert len(state) == (2 if counted else 1)
    assert counted == (kind != "sum"), "only a sum of talk time has nothing to count"


@pytest.mark.parametrize("kind", WINDOWED)
def test_entities_past_the_bound_are_evicted_and_idle_ones_dropped(kind: str) -> None:
    rule = rule_for(kind, max_keys=64)
    tracker = CallTracker()
    rule.started_at = T0
    for n in range(500):
        at = T0 + n * 0.01
        rule.evaluate(a_call(n, at, caller=f"86139{n:08d}"), at, tracker)
    assert len(rule.state) <= 64
    assert rule.state.evicted == 500 - len(rule.state)
    tracked = len(rule.state)
    touched = [state.last_ts for state in rule.state.states.values()]
    kept = rule.aggregate.keep_s + rule.touch_s
    assert rule.drop_idle(min(touched) + kept - 0.5) == 0, "within the time an entity is kept"
    assert rule.drop_idle(max(touched) + kept + 0.5) == tracked
    assert len(rule.state) == 0


@pytest.mark.parametrize("kind", WINDOWED)
def test_a_state_restored_from_a_snapshot_measures_as_the_one_that_never_stopped(
    kind: str,
) -> None:
    aggregate = rule_for(kind).aggregate
    aggregate.started_at = T0 - 10 * WINDOW
    state = aggregate.new_state(T0)
    for n in range(30):
        take(aggregate, state, a_call(n, T0 + n * 7.0), T0 + n * 7.0)
    copy = pickle.loads(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(copy) is type(state)
    assert pickle.dumps(copy) == pickle.dumps(state)
    slots = {name for klass in type(state).__mro__ for name in getattr(klass, "__slots__", ())}
    attributes = set(getattr(type(state), "__mypyc_attrs__", ())) - {"__dict__", "__weakref__"}
    assert set(state.state_fields()) == (attributes or slots), "a slot kept out of snapshots"
    for n in range(30, 45):
        at = T0 + n * 7.0
        values = []
        for one in (state, copy):
            take(aggregate, one, a_call(n, at), at)
            values.append(aggregate.measure(one, a_call(n, at)))
        assert values[0] == values[1]
        assert copy.live_call_ids() == state.live_call_ids()


@pytest.mark.parametrize("kind", WINDOWED)
def test_what_an_aggregate_learned_across_entities_survives_a_snapshot(kind: str) -> None:
    # Beside each entity's state, what the rule learned from all of them (the peers'
    # share of `unusual_share`): a rule made anew and given it back knows the same.
    rule = rule_for(kind)
    aggregate = rule.aggregate
    aggregate.started_at = T0 - 10 * WINDOW
    for n in range(300):
        at = T0 + n * 0.5
        take(aggregate, aggregate.new_state(at), a_call(n, at, caller=f"86139{n:08d}"), at)
    learned = aggregate.learned()
    fresh = rule_for(kind).aggregate
    if learned is None:
        assert fresh.learned() is None, "nothing learned across entities, none to restore"
        return
    assert learned != fresh.learned(), "the calls taught it something"
    state = {"learned": {rule.id: (rule.logic, learned)}}
    restored = decode(encode(Snapshot(Position(1, 1), state, 0.0))).state["learned"]
    fresh.take_learned(restored[rule.id][1])
    assert fresh.learned() == learned


@pytest.mark.parametrize("kind", WINDOWED)
def test_a_flood_into_one_entity_keeps_a_bounded_window_and_the_newest_evidence(
    kind: str,
) -> None:
    # 40 calls/s of one caller for 150 s, a 60 s window: 2,400 calls in it, more than
    # FOLD_AT. The window holds a bounded number of entries one by one, counts what a
    # window kept call by call counts to within one bucket (60/64 s, 38 calls) at its
    # old edge, names the newest 200 calls as evidence, and survives a snapshot.
    rule = rule_for(kind)
    rule.started_at = T0 - 10 * WINDOW
    tracker = CallTracker()
    rate, calls = 40.0, 6_000
    widest = 0
    for n in range(calls):
        at = T0 + n / rate
        rule.evaluate(a_call(n, at), at, tracker)
        state = rule.state.states["8613800000001"]
        widest = max(widest, len(state.entries))
    if kind == "new_value":
        # Past NEW_VALUE_MAX_SEEN values an entity is judged no further and its calls
        # leave the window as they came: bounded without folding.
        assert widest <= 2 * NEW_VALUE_MAX_SEEN, "bounded: a timestamp and an id per call"
        return
    assert widest <= 4 * FOLD_AT + 1, "held call by call whatever the rate"
    assert state.head & 1, "folded"
    in_window = int(rate * WINDOW)
    assert in_window <= len(state) <= in_window + int(rate * WINDOW / 64) + 2
    assert state.live_call_ids() == [f"c{n}" for n in range(calls - 200, calls)]
    snapshot = Snapshot(Position(1, 1), {"rules": {rule.id: rule.state}}, 0.0)
    restored = decode(encode(snapshot)).state["rules"][rule.id].states["8613800000001"]
    assert type(restored) is type(state) and len(restored) == len(state)
    assert restored.live_call_ids() == state.live_call_ids()
    assert rule.aggregate.measure(restored, a_call(calls, at)) == rule.aggregate.measure(
        state, a_call(calls, at)
    )
    # Quiet for a window: everything leaves, folded buckets and all.
    rule.evaluate(a_call(calls, at + WINDOW), at + WINDOW, tracker)
    assert len(state) == 1 and state.head & 1 == 0


def test_concurrent_counts_the_callers_calls_in_progress_within_its_window() -> None:
    tracker = CallTracker()
    for n, at in enumerate((0.0, 30.0, 50.0)):
        tracker.observe(
            CallEvent(T0 + at, f"c{n}", 1, CallState.RINGING, 180, "1", "2", "", "7", "M", "")
        )
    always, within = rule_for("concurrent", window=None), rule_for("concurrent", window=30)
    for rule, expected in ((always, ["c2", "c1", "c0"]), (within, ["c2", "c1"])):
        aggregate = rule.aggregate
        assert isinstance(aggregate, Concurrent) and not aggregate.windowed
        judged = tracker.open["c2"]
        in_progress = aggregate.in_progress(tracker, "1", T0 + 50.0, judged)
        assert [call.call_id for call in in_progress] == expected
        assert not aggregate.may_hold(tracker, "1"), "3 calls cannot be a million"
    assert isinstance(at_most := rule_for("concurrent", op="<=").aggregate, Concurrent)
    assert at_most.may_hold(tracker, "1")


def test_concurrent_with_a_field_counts_the_calls_in_progress_that_share_its_value() -> None:
    # Four calls in progress from one caller, three into menu 7 and one into menu 8.
    tracker = CallTracker()
    for n, (at, menu) in enumerate(((0.0, "7"), (10.0, "8"), (20.0, "7"), (30.0, "7"))):
        tracker.observe(
            CallEvent(T0 + at, f"c{n}", 1, CallState.ANSWERED, 200, "1", "2", "", menu, "M", "")
        )
    spec = call_start_spec(
        {"type": "concurrent", "group_by": "caller", "window": 60, "field": "menu_id"}
    )
    aggregate = CompiledRule(spec, {}, source="t", version="t", max_keys=10).aggregate
    assert isinstance(aggregate, Concurrent)
    into_7 = aggregate.in_progress(tracker, "1", T0 + 30.0, tracker.open["c3"])
    assert [call.call_id for call in into_7] == ["c3", "c2", "c0"]
    into_8 = aggregate.in_progress(tracker, "1", T0 + 30.0, tracker.open["c1"])
    assert [call.call_id for call in into_8] == ["c1"]


def test_concurrent_with_min_share_counts_only_calls_converging_on_one_value() -> None:
    # Six calls in progress: three into menu 7, two into menu 8, one into menu 9 (a
    # busy caller's spread); with `min_share: 0.75` none count, as long as they are
    # spread, and all of menu 7's once three in four of the calls are into it.
    tracker = CallTracker()
    menus = ("7", "8", "7", "9", "8", "7")
    for n, menu in enumerate(menus):
        tracker.observe(
            CallEvent(T0 + n, f"c{n}", 1, CallState.RINGING, 180, "1", "2", "", menu, "M", "")
        )
    spec = call_start_spec(
        {
            "type": "concurrent",
            "group_by": "caller",
            "window": 60,
            "field": "menu_id",
            "min_share": 0.75,
        }
    )
    aggregate = CompiledRule(spec, {}, source="t", version="t", max_keys=10).aggregate
    assert isinstance(aggregate, Concurrent)
    assert aggregate.in_progress(tracker, "1", T0 + 5.0, tracker.open["c5"]) == []
    for n in range(6, 12):
        tracker.observe(
            CallEvent(T0 + n, f"c{n}", 1, CallState.RINGING, 180, "1", "2", "", "7", "M", "")
        )
    into_7 = aggregate.in_progress(tracker, "1", T0 + 11.0, tracker.open["c11"])
    assert len(into_7) == 9, "9 of 12 calls in progress go to menu 7"
    # The bound is part of the rule's logic only where it is set.
    assert "min_share" in spec.aggregate.model_dump()
    assert "min_share" not in rule_for("concurrent").spec.aggregate.model_dump()


def test_min_share_needs_a_concurrent_aggregate_with_a_field() -> None:
    for aggregate in (
        {"type": "concurrent", "group_by": "caller", "min_share": 0.5},
        {"type": "count", "group_by": "caller", "window": 60, "min_share": 0.5},
    ):
        with pytest.raises(ValueError, match="min_share"):
            call_start_spec(aggregate, "bad")


def test_concurrent_calls_share_a_text_field_not_a_duration() -> None:
    with pytest.raises(ValueError, match="share a text field"):
        call_start_spec({"type": "concurrent", "group_by": "caller", "field": "talk_s"}, "bad")


@pytest.mark.parametrize("op", list(COMPARISONS))
@given(
    threshold=st.floats(-1e6, 1e6),
    most=st.floats(-1e6, 1e6),
    below=st.floats(0, 1e6),
)
def test_a_bound_that_may_not_hold_rules_out_every_value_below_it(
    op: str, threshold: float, most: float, below: float
) -> None:
    comparison = COMPARISONS[op](threshold)
    if comparison.holds(most - below):
        assert comparison.may_hold_up_to(most)
